"""The node configuration: parsed once, at the edge, into frozen dataclasses.

Every key is a dataclass field; the same converter validates the TOML file, `NEURON_*`
environment overrides and model specs posted to `POST /models/load`, so all three give the
same one-line errors naming the offending key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import re
import string
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import clip
from .suggest import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/neuron/neuron.toml")
DEFAULT_HARNESS = "llama-cpp-python"
# The API's port: the daemon's default, and the one a client assumes (`HOST` alone, no config).
DEFAULT_PORT = 13131
ENV_PREFIX = "NEURON_"
# NEURON_* variables that belong to the CLI client, not to the config file.
CLIENT_ENV_VARS = frozenset({"NEURON_URL", "NEURON_CONFIG", "NEURON_API_KEY",
                             "NEURON_API_KEY_FILE"})
MAX_MODEL_ID_LEN = 256
MAX_PARALLEL = 256
RESTART_POLICIES = ("on-failure", "always", "never")
# The daemon's event loop (node/eventloop.py): "auto" is uvloop where it is installed.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
_INT32_MAX = 2**31 - 1
# Upper bounds of times (seconds): a week for anything, tighter where a wait holds
# something others need.
MAX_SECONDS = 7 * 24 * 3600.0
_MAX_SECONDS = {"ready_timeout_s": 3600.0, "stop_timeout_s": 600.0, "eviction_wait_s": 3600.0,
                "queue_timeout_s": 3600.0, "liveness_timeout_s": 600.0,
                "vram_release_timeout_s": 3600.0}
MAX_QUEUE = 100_000
# Longest path a key may hold (Linux's PATH_MAX): a longer one names no file, and every
# error, journal line and listing that quotes it would carry it.
MAX_PATH_LEN = 4096
# A load request's `ready_timeout_s` holds a worker start (and, until the worker spawns,
# the node-wide load lock): a client gets at most this, the config up to 3600 s.
MAX_API_READY_TIMEOUT_S = 600.0


class ConfigError(Exception):
    """A config problem, phrased as one line an operator can act on."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


@dataclass(frozen=True)
class HarnessConfig:
    """`[harness.NAME]`: defaults for every model run by that harness."""

    # Interpreter that runs llama-cpp-python workers; a venv with a CUDA build, say.
    python: str | None = None
    # The llama-server executable (a path, or a name looked up on PATH).
    binary: str | None = None
    hf_cache: Path | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    chat_format: str | None = None
    args: tuple[str, ...] = ()
    ready_timeout_s: float | None = None
    # Requests its worker serves at once (llama-server's slots); llama-cpp-python: 1.
    parallel: int | None = None
    # Flags `args` of POST /models/load may use beyond the built-in allow-list
    # (apiargs.py); the config's own `args` are never limited by it.
    api_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """One model: a `[[default_models]]` entry or the body of `POST /models/load`."""

    model_id: str
    harness: str = DEFAULT_HARNESS
    path: Path | None = None
    # Without `path`, `repo` (default: model_id) is a Hugging Face repo: `file` names the
    # GGUF in it, or `quant` picks it; `revision` is a branch, tag or commit (default: main).
    # With `repo`, ids can be short aliases and two quants of one repo two models.
    repo: str | None = None
    file: str | None = None
    quant: str | None = None
    revision: str | None = None
    devices: tuple[int, ...] = ()
    # Share of the model per device, as llama.cpp's tensor split; unset: by free VRAM.
    tensor_split: tuple[float, ...] = ()
    # Load even when the VRAM estimate says the model does not fit.
    force: bool = False
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    chat_format: str | None = None
    args: tuple[str, ...] = ()
    ready_timeout_s: float | None = None
    # Restart policy for this model; unset means the node's.
    restart: str | None = None
    max_restarts: int | None = None
    # Unload after this long without a request through /v1; a default model only idles out
    # when its own entry sets this (the node's ttl_s does not apply to it).
    ttl_s: float | None = None
    # Requests in flight to its worker at once (unset: the harness's, else 1); the rest wait
    # in its queue, at most `max_queue` of them for at most `queue_timeout_s` (unset: the
    # node's values).
    parallel: int | None = None
    max_queue: int | None = None
    queue_timeout_s: float | None = None
    # Never evicted to make room for another model (unset: default models are, others not).
    pinned: bool | None = None
    # A /v1 request naming it loads it when it is not loaded (unset: the node's `autoload`).
    autoload: bool | None = None
    # Save what its worker's slots hold when it is stopped on purpose, restore it at its
    # next load (supervisor/promptcache.py). Unset: on where the harness can (llama-server).
    prompt_cache: bool | None = None


# What a named key may do (docs/security.md): `inference` uses models (/v1, /api), `read`
# reads the node's state, `admin` does everything.
KEY_ROLES = ("inference", "read", "admin")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# The name `api_key`'s holder goes by in logs, metrics and /keys/usage.
API_KEY_NAME = "api_key"


@dataclass(frozen=True)
class KeySpec:
    """`[[keys]]`: one named key, its roles, the models it may use and its limits. Exactly
    one of `sha256`, `file` or `credential` says what the key is; after `load_config` its
    `sha256` is always set (a file's or a credential's key hashed as it is read), and no
    plaintext key is kept."""

    name: str
    roles: tuple[str, ...]
    sha256: str | None = field(default=None, repr=False)
    file: Path | None = None
    # A systemd credential: `$CREDENTIALS_DIRECTORY/NAME` (LoadCredential=).
    credential: str | None = None
    # Model ids an inference key may use, as globs (`qwen*`); empty: every model.
    models: tuple[str, ...] = ()
    rpm: int | None = None  # requests per minute to model-serving routes
    max_concurrent: int | None = None  # such requests in flight at once


@dataclass(frozen=True)
class NeuronConfig:
    port: int = DEFAULT_PORT
    host: str = "0.0.0.0"
    # How gateways and `neuronctl fleet` name this node (docs/fleet.md); unset: host name
    # and port (`gpu1:13131`), since host names alone collide.
    node_id: str | None = None
    # When set, every route but GET /health needs `Authorization: Bearer KEY` or `x-api-key`.
    # Never shown in a repr: config objects end up in logs and tracebacks.
    api_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None  # read at load time; must not be world-readable
    # Named keys with roles, model scopes and limits, beside `api_key` (which is an admin
    # key); reloadable, unlike `api_key`.
    keys: tuple[KeySpec, ...] = ()
    # Host names the API answers to besides its own (crosssite.py): a DNS name a proxy or
    # the operator uses. Any other `Host` is a 421, so a DNS-rebinding page reads nothing.
    allowed_hosts: tuple[str, ...] = ()
    # Whether clients on other hosts may load models by `path`, `args` or Hugging Face repo
    # (off: they may load catalogue models by id; the node's own host may do everything).
    allow_remote_loads: bool = False
    # Idle models (no /v1 request for this long) are unloaded; None: never. See ModelSpec.
    ttl_s: float | None = None
    log_dir: Path = Path("/var/log/neuron")
    state_dir: Path = Path("/var/lib/neuron")
    # The daemon's event loop (EVENT_LOOPS), read at start.
    event_loop: str = "auto"
    # How long a worker gets between SIGTERM and SIGKILL.
    stop_timeout_s: float = 10.0
    # Largest request body the OpenAI-compatible router (/v1/...) accepts; more is a 413.
    max_request_bytes: int = 16 * 1024 * 1024
    # Previous logs kept per model: <model>.log.1 (the start before this one) .. .log.N.
    log_keep: int = 5
    # What happens when a ready worker exits without being asked to (node defaults).
    restart: str = "on-failure"
    max_restarts: int = 5  # within restart_window_s; then the model is `failed`
    restart_window_s: float = 600.0
    restart_delay_s: float = 1.0  # first delay; doubles per consecutive crash
    restart_delay_max_s: float = 60.0
    restart_reset_s: float = 60.0  # ready this long: the next crash starts over at restart_delay_s
    # After a worker on a GPU stops, the next load waits up to this long for the driver to
    # report its memory free again.
    vram_release_timeout_s: float = 30.0
    gpu_poll_interval_s: float = 5.0  # nvidia-smi readings are refreshed this often
    # Per model: requests waiting for a slot of its worker (beyond `parallel` in flight);
    # one more is a 429. A request waits at most queue_timeout_s (then 503), a model that is
    # loading or restarting included.
    max_queue: int = 64
    queue_timeout_s: float = 120.0
    # All queues of the node together: the bytes of request bodies waiting for a slot; a
    # body that would pass it is a 429 (queue_bytes_full). At least max_request_bytes.
    max_queued_bytes: int = 256 * 1024 * 1024
    # A worker's non-streamed answer, once it has begun, must bring a byte this often;
    # else it is cut (a 502 when nothing was sent yet) and its slot is free again.
    upstream_idle_timeout_s: float = 120.0
    # While a model is ready its worker is probed this often; after `liveness_failures`
    # probes in a row that fail or take over `liveness_timeout_s`, it is killed (SIGKILL to
    # its group: a worker that does not answer its lock-free probe is hung, not busy) and
    # handled as a crash. After a failed probe the next one comes sooner (liveness.py).
    # So a hung worker is killed within about 2 + 3 + 0.5 + 3 = 8.5 s, and serves again
    # one restart_delay_s and one load later.
    liveness_interval_s: float = 2.0
    liveness_timeout_s: float = 3.0
    liveness_failures: int = 2
    # The API's listener (neuronctl/api/guard.py): a request head must be in this long after
    # the connection opened (or after its first byte, on a kept-alive connection); a body
    # must bring 1 KiB (or end) every body_timeout_s; at max_connections open a new one
    # takes the place of the one waiting longest for its head, or gets a 503. None: sized
    # from the open files limit.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int | None = None
    default_models: tuple[ModelSpec, ...] = ()
    # The catalogue: models this node may serve besides the default ones, loaded by id
    # (`POST /models/load {"model_id": ...}`) or on demand by a /v1 request naming them.
    models: tuple[ModelSpec, ...] = ()
    autoload: bool = True
    # After activation, download the catalogue's Hugging Face models that the cache lacks,
    # one at a time at low priority, so a first on-demand request does not wait for one.
    prefetch: bool = False
    # At most this many models loaded at once (None: no limit but VRAM); a load beyond it
    # first unloads the least recently used model that is idle and not pinned.
    max_loaded_models: int | None = None
    # How long a load waits for a model to become idle enough to evict, then a 503.
    eviction_wait_s: float = 120.0
    # Models a client may start through `POST /models/load` that are not in the catalogue
    # (a `path` or repo of its own), loaded at once; 0: clients load catalogue models only.
    max_api_models: int = 4
    # Prompt caches saved under state_dir/prompt-cache (supervisor/promptcache.py): at most
    # this many bytes for all models together and for any one model (least recently used
    # files removed first), each save given at most prompt_cache_save_timeout_s (then it
    # gives up, so an eviction is never held up by it).
    prompt_cache_bytes: int = 8 * 1024**3
    prompt_cache_model_bytes: int = 2 * 1024**3
    prompt_cache_save_timeout_s: float = 2.0
    harness: Mapping[str, HarnessConfig] = field(default_factory=dict)

    def harness_config(self, name: str) -> HarnessConfig:
        return self.harness.get(name) or HarnessConfig()

    def catalogue(self) -> Mapping[str, ModelSpec]:
        """Every model this node may serve, by id: the default models, then `models`."""
        return self._catalogue

    def is_default(self, model_id: str) -> bool:
        return model_id in self._default_ids

    # Built once per config (it is frozen): listings ask per model, for thousands of models.
    @functools.cached_property
    def _catalogue(self) -> Mapping[str, ModelSpec]:
        return types.MappingProxyType(
            {spec.model_id: spec for spec in (*self.default_models, *self.models)})

    @functools.cached_property
    def _default_ids(self) -> frozenset[str]:
        return frozenset(spec.model_id for spec in self.default_models)

    def pinned(self, spec: ModelSpec) -> bool:
        """Whether eviction may never pick this model: its catalogue entry's `pinned` as
        this config has it (a reload changes it without a restart; else the spec's own),
        unset meaning whether it is a default model (the operator listed them to be up)."""
        pinned = self.catalogue().get(spec.model_id, spec).pinned
        return self.is_default(spec.model_id) if pinned is None else pinned

    def autoloads(self, spec: ModelSpec) -> bool:
        autoload = self.catalogue().get(spec.model_id, spec).autoload
        return self.autoload if autoload is None else autoload

    def ttl_for(self, spec: ModelSpec) -> float | None:
        """The idle TTL that applies to `spec`: its own `ttl_s`, else the node's, except
        for a default model, which only idles out by its own entry (the operator listed it
        to be up)."""
        if spec.ttl_s is not None:
            return spec.ttl_s
        return None if self.is_default(spec.model_id) else self.ttl_s


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None
) -> NeuronConfig:
    """Read the TOML file at `path` (default /etc/neuron/neuron.toml), apply `NEURON_*`
    overrides from `environ`, validate, and return the frozen config."""
    path = path or DEFAULT_CONFIG_PATH
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "config file not found", source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"not UTF-8 text (byte {exc.start})", source) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", source) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", source) from None
    except RecursionError:
        raise ConfigError("", "invalid TOML: nested too deeply", source) from None
    return _with_env(raw, environ, source, path.parent.resolve())


def read_keys_leniently(path: Path, keys: tuple[str, ...],
                        problems: list[str] | None = None) -> dict[str, Any]:
    """The top-level `keys` of the config file at `path` that are valid, converted exactly
    as `load_config` converts them (`~` expanded, relative paths next to the file); a key
    with a bad value is left out rather than failing the whole read, and of an array of
    tables (`[[keys]]`) the entries that are valid are kept. For clients (the CLI), which
    must reach a running daemon when the file has a mistake elsewhere: with `problems`, a
    file that is not valid TOML (being edited, say) is read as far as it parses
    (`_parsable_parts`) and why it could not be read whole appended to `problems`."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError("", "config file not found", source) from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        if problems is None:
            raise ConfigError("", f"cannot read config file: {exc}", source) from None
        problems.append(str(ConfigError("", f"cannot read config file: {exc}", source)))
        raw = _parsable_parts(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"cannot read config file: {exc}", source) from None
    hints = typing.get_type_hints(NeuronConfig)
    base_dir = path.parent.resolve()
    values: dict[str, Any] = {}
    for key in keys:
        if key not in raw:
            continue
        try:
            values[key] = _convert(raw[key], hints[key], key, base_dir)
        except ConfigError:
            entries = _valid_entries(raw[key], hints[key], key, base_dir)
            if entries is not None:
                values[key] = entries
    return values


def _valid_entries(value: Any, tp: Any, key: str, base_dir: Path) -> tuple[Any, ...] | None:
    """Of an array of tables (`[[keys]]`), the entries that convert; None for any other
    kind of value."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is not tuple or not dataclasses.is_dataclass(args[0]) \
            or not isinstance(value, list):
        return None
    entries = []
    for i, item in enumerate(value):
        with contextlib.suppress(ConfigError):
            entries.append(_convert(item, args[0], f"{key}[{i}]", base_dir))
    return tuple(entries)


def _parsable_parts(text: str) -> dict[str, Any]:
    """What a file that is not valid TOML still says: each line before the first table
    parsed alone (a broken line, or a value over several lines, is skipped), then each
    table, from its header to the next one, kept when it parses with those kept before it.
    So a half-edited `[[models]]` entry or top-level line does not hide the `[[keys]]`
    entry that names the admin key's file."""
    found: dict[str, Any] = {}
    tables: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            tables.append(line)
        elif tables:
            tables[-1] += "\n" + line
        else:
            with contextlib.suppress(tomllib.TOMLDecodeError, RecursionError):
                found.update(tomllib.loads(line))
    whole = [table for table in tables if _parses(table)]
    try:
        parsed = tomllib.loads("\n".join(whole))
    except (tomllib.TOMLDecodeError, RecursionError):
        # Tables that parse alone but not together (one header twice): one at a time,
        # each kept when it parses with those before it.
        kept: list[str] = []
        for table in whole:
            if _parses("\n".join([*kept, table])):
                kept.append(table)
        parsed = tomllib.loads("\n".join(kept))
    for key, value in parsed.items():
        found.setdefault(key, value)
    return found


def _parses(text: str) -> bool:
    try:
        tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError):
        return False
    return True


def config_from_env(environ: Mapping[str, str] | None = None) -> NeuronConfig:
    """The defaults plus `NEURON_*` overrides: for a CLI run on a host without a config."""
    return _with_env({}, environ, "defaults", None)


def _with_env(
    raw: dict[str, Any], environ: Mapping[str, str] | None, source: str, base_dir: Path | None
) -> NeuronConfig:
    env_keys = apply_env_overrides(raw, os.environ if environ is None else environ)
    try:
        return config_from_mapping(raw, base_dir=base_dir)
    except ConfigError as exc:
        top = exc.key.split(".")[0].split("[")[0]
        var = env_keys.get(exc.key) or env_keys.get(top)
        exc.source = f"environment {var}" if var else source
        raise


def config_from_mapping(raw: Mapping[str, Any], base_dir: Path | None = None) -> NeuronConfig:
    config: NeuronConfig = _convert_dataclass(NeuronConfig, raw, "", base_dir)
    seen: set[str] = set()
    for table, specs in (("default_models", config.default_models), ("models", config.models)):
        for i, spec in enumerate(specs):
            if spec.model_id in seen:
                raise ConfigError(f"{table}[{i}].model_id",
                                  f"duplicate model {spec.model_id!r}")
            seen.add(spec.model_id)
    if config.api_key_file is not None:
        if config.api_key is not None:
            raise ConfigError("api_key_file", "set api_key or api_key_file, not both")
        config = dataclasses.replace(config, api_key=_read_key_file(config.api_key_file))
    if config.api_key is not None and not config.api_key.strip():
        raise ConfigError("api_key", "must not be empty")
    if config.keys:
        config = dataclasses.replace(config, keys=_resolve_keys(config.keys))
        if config.api_key is not None:
            digest = hashlib.sha256(config.api_key.encode("utf-8", "surrogateescape"))
            same = [k.name for k in config.keys if k.sha256 == digest.hexdigest()]
            if same:
                raise ConfigError("api_key", f"is the same key as [[keys]] {same[0]!r}; "
                                  "give each its own")
    return config


def _resolve_keys(keys: tuple[KeySpec, ...]) -> tuple[KeySpec, ...]:
    """Every key with its `sha256` set: a file's or a credential's key is read and hashed
    now (a reload reads them again), so the config holds no plaintext key."""
    names: set[str] = set()
    resolved = []
    for i, key in enumerate(keys):
        where = f"keys[{i}]"
        if key.name in names:
            raise ConfigError(f"{where}.name", f"duplicate key name {key.name!r}")
        names.add(key.name)
        if key.file is not None:
            secret = _read_secret(key.file, f"{where}.file")
        elif key.credential is not None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(f"{where}.credential",
                                  "$CREDENTIALS_DIRECTORY is not set: a credential needs "
                                  f"LoadCredential={key.credential}:PATH in the unit "
                                  "(docs/security.md), or use file or sha256")
            secret = _read_secret(Path(directory) / key.credential, f"{where}.credential")
        else:
            resolved.append(dataclasses.replace(key, sha256=(key.sha256 or "").lower()))
            continue
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
        resolved.append(dataclasses.replace(key, sha256=digest))
    # One key, two entries: whichever matched first would decide its rights, silently.
    first: dict[str | None, str] = {}
    for i, key in enumerate(resolved):
        if key.sha256 in first:
            raise ConfigError(f"keys[{i}]", f"key {key.name!r} is the same key as "
                              f"{first[key.sha256]!r}; give each its own")
        first[key.sha256] = key.name
    return tuple(resolved)


def _read_secret(path: Path, key: str) -> str:
    """A key file of `[[keys]]`, by `api_key_file`'s rule: refused when every user may
    read it (a key anyone may read is no secret); `chmod 640`, owner root, group neuron, is
    how the daemon's user reads it (systemd's credentials are 0400)."""
    try:
        mode = path.stat().st_mode
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if mode & 0o004:
        raise ConfigError(key, f"{path} is readable by every user (mode {mode & 0o777:o}); "
                               f"chmod o-rwx {path}")
    if not secret:
        raise ConfigError(key, f"{path} is empty")
    return secret


def _read_key_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError("api_key_file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("api_key_file", f"{path} is not UTF-8 text") from None
    if mode & 0o004:
        raise ConfigError(
            "api_key_file",
            f"{path} is readable by every user (mode {mode & 0o777:o}); "
            f"chmod o-rwx {path}",
        )
    if not key:
        raise ConfigError("api_key_file", f"{path} is empty")
    return key


def model_spec_from_mapping(raw: Any, base_dir: Path | None = None) -> ModelSpec:
    """Validate a model spec from outside (the HTTP API), exactly as the config file is,
    with the lower ceilings a client gets."""
    spec: ModelSpec = _convert(raw, ModelSpec, "", base_dir)
    if spec.ready_timeout_s is not None and spec.ready_timeout_s > MAX_API_READY_TIMEOUT_S:
        raise ConfigError("ready_timeout_s",
                          f"must be at most {MAX_API_READY_TIMEOUT_S:g} s in a load request "
                          f"(a config entry may set more), got {spec.ready_timeout_s:g}")
    return spec


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Fold `NEURON_KEY=value` (nested with `__`) into `raw`; return {key: variable}.

    Values are read as TOML values when they parse (`14000`, `true`, `[0, 1]`) and as plain
    strings otherwise, so `NEURON_LOG_DIR=/srv/log` needs no quoting.
    """
    applied: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in CLIENT_ENV_VARS:
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        if not all(parts):
            raise ConfigError("", "empty key segment", f"environment {var}")
        table = raw
        keys = []
        for i, part in enumerate(parts[:-1]):
            # Harness names use dashes, which environment names cannot hold.
            key = _match_key(table, part) if i > 0 else part
            keys.append(key)
            child = table.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys), "is not a table", f"environment {var}")
            table = child
        table[parts[-1]] = _parse_env_value(environ[var])
        applied[".".join([*keys, parts[-1]])] = var
    return applied


def _match_key(table: Mapping[str, Any], part: str) -> str:
    for key in table:
        if key.replace("-", "_") == part:
            return key
    return part.replace("_", "-")


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


# --- conversion -----------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 40 else kind


def _convert_dataclass(cls: type[Any], raw: Any, key: str, base_dir: Path | None) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a table, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            raise ConfigError(_join(key, str(name)),
                              f"unknown key{did_you_mean(str(name), fields)}")
        values[name] = _convert(value, hints[name], _join(key, name), base_dir)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise ConfigError(_join(key, name), "required key is missing")
    if cls is HarnessConfig and base_dir is not None:
        # A program named by a relative path (`./llama-server`, `bin/python`) is next to
        # the config file, as every other relative path; a bare name is looked up on PATH.
        for name in ("python", "binary"):
            program = values.get(name)
            if program and "/" in program and not os.path.isabs(os.path.expanduser(program)):
                values[name] = str(base_dir / program)
            elif program and program.startswith("~"):
                values[name] = os.path.expanduser(program)
    obj = cls(**values)
    _check_values(obj, key)
    return obj


def _convert(value: Any, tp: Any, key: str, base_dir: Path | None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, base_dir)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, key, base_dir)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected an array, got {_describe(value)}")
        return tuple(_convert(v, args[0], f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a table, got {_describe(value)}")
        return {
            str(k): _convert(v, args[1], _join(key, str(k)), base_dir) for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(key, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {_describe(value)}")
        if "\x00" in value:  # no command line or file name can carry one
            raise ConfigError(key, "contains a NUL character")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path string, got {_describe(value)}")
        if "\x00" in value:
            raise ConfigError(key, "contains a NUL character")
        if len(value) > MAX_PATH_LEN:
            raise ConfigError(key, f"longer than {MAX_PATH_LEN} characters (PATH_MAX), "
                                   f"got {len(value)}")
        path = Path(value).expanduser()
        # Relative paths in a config file mean "next to the config file", not "wherever
        # systemd's working directory happens to be".
        if base_dir is not None and not path.is_absolute():
            return Path(os.path.normpath(base_dir / path))
        return path
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug, not bad input


def _check_values(obj: Any, key: str) -> None:
    """Range checks that types alone cannot express."""
    if isinstance(obj, NeuronConfig):
        if not 1 <= obj.port <= 65535:
            raise ConfigError(_join(key, "port"), f"must be between 1 and 65535, got {obj.port}")
        if not obj.host:
            raise ConfigError(_join(key, "host"), "must not be empty")
        if obj.node_id is not None:
            _check_node_id(obj.node_id, _join(key, "node_id"))
        for name in ("header_timeout_s", "body_timeout_s"):
            seconds = getattr(obj, name)
            if not 0 < seconds <= 3600:
                raise ConfigError(_join(key, name),
                                  f"must be positive and at most 3600 s, got {seconds:g}")
        for i, name in enumerate(obj.allowed_hosts):
            if not _HOST_NAME.fullmatch(name):
                raise ConfigError(f"{_join(key, 'allowed_hosts')}[{i}]",
                                  f"{name!r} is not a host name (letters, digits, . and -; "
                                  "a leading '.' for a domain and its subdomains)")
        if obj.max_connections is not None and not 1 <= obj.max_connections <= 1_000_000:
            raise ConfigError(_join(key, "max_connections"),
                              f"must be between 1 and 1000000, got {obj.max_connections}")
        if obj.max_queued_bytes < obj.max_request_bytes:  # else the largest body never waits
            raise ConfigError(_join(key, "max_queued_bytes"),
                              f"must be at least max_request_bytes ({obj.max_request_bytes}), "
                              f"got {obj.max_queued_bytes}")
        for name in ("prompt_cache_bytes", "prompt_cache_model_bytes"):
            if not 0 <= getattr(obj, name) <= 2**50:
                raise ConfigError(_join(key, name), f"must be between 0 and 2**50 bytes, "
                                  f"got {getattr(obj, name)}")
        if not 0 < obj.prompt_cache_save_timeout_s <= 600:
            raise ConfigError(_join(key, "prompt_cache_save_timeout_s"), "must be positive "
                              f"and at most 600 s, got {obj.prompt_cache_save_timeout_s:g}")
        if not 0 < obj.upstream_idle_timeout_s <= 3600:
            raise ConfigError(_join(key, "upstream_idle_timeout_s"), "must be positive and at "
                              f"most 3600 s, got {obj.upstream_idle_timeout_s:g}")
    if isinstance(obj, HarnessConfig):
        _check_api_args(obj, key)
    if isinstance(obj, KeySpec):
        _check_key(obj, key)
    if isinstance(obj, ModelSpec):
        check_model_id(obj.model_id, _join(key, "model_id"))
        if not obj.harness:
            raise ConfigError(_join(key, "harness"), "must not be empty")
        for i, device in enumerate(obj.devices):
            if device < 0:
                raise ConfigError(f"{_join(key, 'devices')}[{i}]", "must be >= 0")
        _check_model_source(obj, key)
    if isinstance(obj, NeuronConfig) and obj.event_loop not in EVENT_LOOPS:
        choices = ", ".join(f'"{p}"' for p in EVENT_LOOPS)
        raise ConfigError(_join(key, "event_loop"),
                          f"must be one of {choices}, got {obj.event_loop!r}")
    restart = getattr(obj, "restart", None)
    if restart is not None and restart not in RESTART_POLICIES:
        choices = ", ".join(f'"{p}"' for p in RESTART_POLICIES)
        raise ConfigError(_join(key, "restart"), f"must be one of {choices}, got {restart!r}")
    max_request_bytes = getattr(obj, "max_request_bytes", None)
    if max_request_bytes is not None and max_request_bytes < 1024:
        raise ConfigError(_join(key, "max_request_bytes"),
                          f"must be at least 1024, got {max_request_bytes}")
    for name, most in (("max_restarts", _INT32_MAX), ("log_keep", 1000),
                       ("max_queue", MAX_QUEUE), ("max_api_models", 10_000)):
        value = getattr(obj, name, None)
        if value is not None and not 0 <= value <= most:
            raise ConfigError(_join(key, name), f"must be between 0 and {most}, got {value}")
    for name, most in (("parallel", MAX_PARALLEL), ("liveness_failures", 1000),
                       ("max_loaded_models", 10_000)):
        value = getattr(obj, name, None)
        if value is not None and not 1 <= value <= most:
            raise ConfigError(_join(key, name), f"must be between 1 and {most}, got {value}")
    if isinstance(obj, ModelSpec) and (obj.parallel or 1) > 1 and obj.harness == DEFAULT_HARNESS:
        raise ConfigError(_join(key, "parallel"),
                          f"{DEFAULT_HARNESS} serves one request at a time; use "
                          'harness = "llama-server" for parallel slots')
    if isinstance(obj, ModelSpec) and obj.prompt_cache and obj.harness == DEFAULT_HARNESS:
        raise ConfigError(_join(key, "prompt_cache"),
                          f"{DEFAULT_HARNESS} cannot keep a prompt cache across a restart; "
                          'use harness = "llama-server" for prompt caches')
    for name in ("n_ctx", "n_gpu_layers"):
        value = getattr(obj, name, None)
        # llama.cpp reads both as 32-bit ints: a bigger number wraps instead of failing.
        if value is not None and abs(value) > _INT32_MAX:
            raise ConfigError(_join(key, name), f"must be at most {_INT32_MAX}, got {value}")
    for name in ("n_ctx", "ready_timeout_s", "stop_timeout_s", "restart_window_s", "ttl_s",
                 "restart_delay_s", "restart_delay_max_s", "restart_reset_s",
                 "vram_release_timeout_s", "gpu_poll_interval_s", "queue_timeout_s",
                 "liveness_interval_s", "liveness_timeout_s", "eviction_wait_s"):
        value = getattr(obj, name, None)
        if value is None:
            continue
        # A context of 0 means "the model's own"; a timeout of 0 would never succeed.
        if value < 0 or (name.endswith("_s") and value == 0):
            raise ConfigError(_join(key, name), f"must be positive, got {value}")
        # Every time has a ceiling: a load spec from a client must not hold the node-wide
        # load lock (ready_timeout_s) or a queue slot for days.
        ceiling = _MAX_SECONDS.get(name, MAX_SECONDS) if name.endswith("_s") else None
        if ceiling is not None and value > ceiling:
            raise ConfigError(_join(key, name),
                              f"must be at most {ceiling:g} s, got {value:g}")


_HOST_NAME = re.compile(r"\.?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")


def _check_api_args(obj: HarnessConfig, key: str) -> None:
    for i, flag in enumerate(obj.api_args):
        if not flag.startswith("-") or "=" in flag or len(flag) > 64:
            raise ConfigError(f"{_join(key, 'api_args')}[{i}]",
                              f"{flag!r}: expected a flag such as \"--override-kv\"")


def _check_key(spec: KeySpec, key: str) -> None:
    if not _KEY_NAME.fullmatch(spec.name) or spec.name == API_KEY_NAME:
        raise ConfigError(_join(key, "name"),
                          f"{clip(spec.name)!r}: 1-64 ASCII letters, digits, . _ -, starting "
                          f"with a letter or a digit (and not {API_KEY_NAME!r})")
    sources = [n for n in ("sha256", "file", "credential") if getattr(spec, n) is not None]
    if len(sources) != 1:
        raise ConfigError(key, "set exactly one of sha256, file or credential, got "
                               f"{', '.join(sources) or 'none'}")
    if spec.sha256 is not None and not _SHA256_HEX.fullmatch(spec.sha256):
        # Never quoted: a plaintext key pasted here by mistake must not reach the journal.
        raise ConfigError(_join(key, "sha256"), "expected 64 hex digits (the SHA-256 of the "
                          "key, as `neuronctl key new` prints it)")
    if spec.credential is not None and not _KEY_NAME.fullmatch(spec.credential):
        raise ConfigError(_join(key, "credential"),
                          f"{clip(spec.credential)!r}: a credential name (letters, digits, "
                          ". _ -), as in LoadCredential=NAME:PATH")
    if not spec.roles:
        raise ConfigError(_join(key, "roles"), f"name at least one of {', '.join(KEY_ROLES)}")
    for i, role in enumerate(spec.roles):
        if role not in KEY_ROLES:
            raise ConfigError(f"{_join(key, 'roles')}[{i}]",
                              f"{clip(role)!r}: must be one of {', '.join(KEY_ROLES)}")
    for i, glob in enumerate(spec.models):
        if not glob or len(glob) > MAX_MODEL_ID_LEN or \
                not set(glob) <= _ID_CHARS | set("*?[]!"):
            raise ConfigError(f"{_join(key, 'models')}[{i}]",
                              f"{clip(glob)!r}: a model id or a glob of one (* ? [])")
    for name, most in (("rpm", 1_000_000), ("max_concurrent", 100_000)):
        value = getattr(spec, name)
        if value is not None and not 1 <= value <= most:
            raise ConfigError(_join(key, name), f"must be between 1 and {most}, got {value}")


def _check_model_source(spec: ModelSpec, key: str) -> None:
    if spec.repo is not None:
        if spec.path is not None:
            raise ConfigError(_join(key, "repo"), "a model has a `path` or a `repo`, not both")
        check_model_id(spec.repo, _join(key, "repo"))
    if spec.file is not None:
        if len(spec.file) > MAX_PATH_LEN:
            raise ConfigError(_join(key, "file"), f"longer than {MAX_PATH_LEN} characters")
        parts = spec.file.split("/")
        if spec.file.startswith("/") or "" in parts or ".." in parts or "." in parts:
            raise ConfigError(_join(key, "file"),
                              f"must be a path in the repo, got {clip(spec.file)!r}")
        if not spec.file.lower().endswith(".gguf"):
            raise ConfigError(_join(key, "file"),
                              f"must name a .gguf file, got {clip(spec.file)!r}")
    for name in ("quant", "revision"):
        if getattr(spec, name) == "":
            raise ConfigError(_join(key, name), "must not be empty")
        if len(getattr(spec, name) or "") > MAX_MODEL_ID_LEN:  # quoted by Hub errors
            raise ConfigError(_join(key, name), f"longer than {MAX_MODEL_ID_LEN} characters")
    if spec.tensor_split:
        if len(spec.tensor_split) != len(spec.devices):
            raise ConfigError(
                _join(key, "tensor_split"),
                f"needs one share per device: {len(spec.tensor_split)} for "
                f"{len(spec.devices)} devices",
            )
        if any(v < 0 for v in spec.tensor_split) or not any(spec.tensor_split):
            raise ConfigError(_join(key, "tensor_split"), "shares must be >= 0, not all 0")


# What a Hugging Face repo id can be (`org/name`, letters, digits, `.`, `_`, `-`) plus what
# aliases commonly use (`llama3:8b`, `qwen+lora@v2`). ASCII only: an id is part of file
# names, URLs and journal lines, where look-alike or invisible characters mislead.
_ID_CHARS = frozenset(string.ascii_letters + string.digits + "._-:+@=/")


def check_model_id(model_id: str, key: str = "model_id") -> None:
    """The one rule for model ids, used by the config, the API and the CLI: 1-256 of
    `_ID_CHARS`, `/`-separated segments that are neither empty nor `.` or `..`, starting
    with a letter or digit."""
    if not model_id.strip():
        raise ConfigError(key, "must not be empty")
    if len(model_id) > MAX_MODEL_ID_LEN:
        raise ConfigError(key, f"longer than {MAX_MODEL_ID_LEN} characters")
    bad = sorted({c for c in model_id if c not in _ID_CHARS})
    if bad:
        shown = ", ".join(repr(c) if c.isprintable() and c != " " else f"U+{ord(c):04X}"
                          for c in bad[:5])
        raise ConfigError(key, f"may hold only ASCII letters, digits and . _ - : + @ = /; "
                               f"got {shown}")
    segments = model_id.split("/")
    if "" in segments or "." in segments or ".." in segments:
        raise ConfigError(key, f"{model_id!r}: no empty, '.' or '..' path segments")
    if not model_id[0].isalnum():
        raise ConfigError(key, f"{model_id!r}: must start with a letter or a digit")


# A node id travels in HTTP headers and in LiteLLM's deployment ids (`NODE@INCARNATION/MODEL`),
# hence no `/` or `@`.
_NODE_ID_CHARS = frozenset(string.ascii_letters + string.digits + "._-:")


def _check_node_id(node_id: str, key: str) -> None:
    if not node_id or len(node_id) > 128:
        raise ConfigError(key, "must be 1 to 128 characters")
    if not set(node_id) <= _NODE_ID_CHARS or not node_id[0].isalnum():
        raise ConfigError(key, f"{node_id!r}: may hold only ASCII letters, digits and . _ - :, "
                               "starting with a letter or a digit")


def model_id_problem(model_id: object) -> str | None:
    """Why `model_id` (from a request) is not a valid id, or None."""
    if not isinstance(model_id, str):
        return "expected a string"
    try:
        check_model_id(model_id)
    except ConfigError as exc:
        return exc.message
    return None


def shown_setting(value: Any) -> str:
    """A setting as the config writes it, for messages: no Python reprs (`PosixPath(...)`,
    `None`, `('a',)`)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(shown_setting(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def same_worker(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs run the same worker: they differ at most in what the node reads
    from the current config when it needs it (`pinned`, `autoload`)."""
    return dataclasses.replace(a, pinned=None, autoload=None) == \
        dataclasses.replace(b, pinned=None, autoload=None)


def effective(spec: ModelSpec, harness: HarnessConfig, name: str) -> Any:
    """A per-model setting, falling back to the harness table's default."""
    value = getattr(spec, name)
    return getattr(harness, name) if value is None else value


def gpu_layers(spec: ModelSpec, harness: HarnessConfig) -> int | None:
    """Layers to offload: None for the server's own default (the CPU), -1 for all of them.

    The one place that decides it: devices named with no `n_gpu_layers` means the operator
    wants the model on those GPUs, all of it (the harnesses and VRAM admission both ask).
    """
    n_gpu_layers: int | None = effective(spec, harness, "n_gpu_layers")
    if n_gpu_layers is None and spec.devices:
        return -1
    return n_gpu_layers
