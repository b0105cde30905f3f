"""A small synchronous client for the control API, used by the CLI.

The standard library is enough here and keeps `neuronctl status` quick to start.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_PORT,
    KeySpec,
    NeuronConfig,
    read_keys_leniently,
)
from .identity import NODE_HEADER
from .notes import local_url, read_listening, read_starting

# What a client refused for want of a key is told: where the CLI's commands find one
# (the hint names the config instead when one was read: `_key_hint`).
KEY_HINT = "set NEURON_API_KEY or use --key-file FILE, or pass the --config that has it"
# The ways to give a key that need no config file, for the hints.
_OTHER_WAYS = "set NEURON_API_KEY or use `neuronctl --key-file FILE COMMAND`"
# Longer than the daemon's keep-alive interval (15 s): a quiet node is not a dead one.
EVENTS_READ_TIMEOUT_S = 45.0
Event = tuple[str, Any]  # a server-sent event: its name and its decoded data


class DaemonNotRunning(Exception):
    def __init__(self, url: str, starting: tuple[int, str] | None = None) -> None:
        if starting is None:
            message = f"neuron is not running at {url}"
        else:  # activation: the listener opens once the default models are loaded
            pid, doing = starting
            message = (f"neuron is starting (pid {pid}): {doing}; {url} answers once its "
                       "default models are loaded")
        super().__init__(message)
        self.url = url
        self.starting = starting


class KeyFileError(Exception):
    """A key file the operator named (`--key-file`, NEURON_API_KEY_FILE) that gives no key;
    the message says where it was named and why."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body


@dataclass(frozen=True)
class ClientSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    log_dir: Path = NeuronConfig.log_dir
    api_key: str | None = None
    state_dir: Path | None = None  # where a starting supervisor leaves its note
    source: Path | None = None  # the config file these came from
    # Why the config named a key file this user could not read a key from, if it did.
    key_problem: str | None = None


def client_settings(path: Path, problems: list[str] | None = None) -> ClientSettings:
    """What a client needs from a config file, read leniently with the daemon's own
    converter: a daemon that runs must stay reachable when the file has a mistake elsewhere
    (the daemon reports those on reload) or when this user may not read the key file
    (NEURON_API_KEY is the way then)."""
    found = read_keys_leniently(path, ("host", "port", "log_dir", "api_key", "api_key_file",
                                       "state_dir", "keys"), problems)
    defaults = ClientSettings()
    port = found.get("port")
    key = found.get("api_key")
    key_file = found.get("api_key_file")
    why: str | None = None
    if key is None and key_file is not None:
        key, why = _read_key(key_file)
    if key is None:
        key, admin_why = _admin_key(found.get("keys", ()))
        why = why or admin_why
    return ClientSettings(
        host=found.get("host") or defaults.host,
        port=port if port is not None and 1 <= port <= 65535 else defaults.port,
        log_dir=found.get("log_dir", defaults.log_dir),
        api_key=key,
        state_dir=found.get("state_dir", NeuronConfig.state_dir),
        source=path,
        key_problem=None if key is not None else why,
    )


def _read_key(path: Path) -> tuple[str | None, str | None]:
    """The key in `path`, or None and why not (said with a 401)."""
    try:
        return path.read_text(encoding="utf-8").strip() or None, f"{path} is empty"
    except FileNotFoundError:
        return None, f"no such file {path}"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text"


def read_named_key(path: Path, named_by: str) -> str:
    """The key in a file the operator named (`named_by`: `--key-file PATH` or
    `NEURON_API_KEY_FILE=PATH`): it must give one, and be no one else's to read (ssh's rule
    for a private key, the daemon's for its key files)."""
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise KeyFileError(f"{named_by}: no such file") from None
    except OSError as exc:
        raise KeyFileError(f"{named_by}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{named_by}: not UTF-8 text") from None
    if mode & 0o004:
        raise KeyFileError(f"{named_by}: readable by every user (mode {mode & 0o777:o}), so "
                           f"the key is no secret; chmod o-rwx {path}")
    if not key:
        raise KeyFileError(f"{named_by}: the file is empty")
    return key


def _admin_key(keys: tuple[KeySpec, ...]) -> tuple[str | None, str | None]:
    """The first admin key of `[[keys]]` this user can read: a `file`, or a systemd
    `credential` when run inside the unit's credentials (a hash alone cannot be sent); else
    None and why the first one named could not be read."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    first_why: str | None = None
    for spec in keys:
        if "admin" not in spec.roles:
            continue
        path = spec.file
        if path is None and spec.credential is not None and directory:
            path = Path(directory) / spec.credential
        if path is None:
            continue
        key, why = _read_key(path)
        if key is not None:
            return key, None
        first_why = first_why or why
    return None, first_why


def settings_for(config_path: Path | None,
                 problems: list[str] | None = None) -> ClientSettings | None:
    """The settings of `--config`, else of the default config file when readable; with
    `problems`, a file that is not valid TOML is read as far as it goes (read_keys_leniently)
    and why is appended there."""
    if config_path is not None:
        return client_settings(config_path, problems)
    if os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        return client_settings(DEFAULT_CONFIG_PATH, problems)
    return None


def normalize_url(url: str) -> str:
    """The daemon's base URL from what an operator may type: `HOST:PORT` or `HOST` (as
    OLLAMA_HOST is written: http, port 13131), `:PORT`, or the OpenAI base URL clients
    use (`http://HOST:PORT/v1`), which names the same node."""
    url = url.strip()
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("not an http(s) URL: it holds spaces or control characters")
    if "://" not in url:
        url = f"http://{url if not url.startswith(':') else '127.0.0.1' + url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        # Never echoed back (it may be a password); the key goes in NEURON_API_KEY.
        raise ValueError("credentials in the URL are not used: set NEURON_API_KEY instead")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    netloc = parts.netloc if port is not None or parts.scheme == "https" \
        else f"{parts.netloc}:{DEFAULT_PORT}"
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def connect(url: str | None, config_path: Path | None, timeout_s: float = 10.0) -> Client:
    """A client for the daemon this CLI invocation means.

    URL: `--url`, else NEURON_URL, else the port in the config file (`--config`, or the
    default one when readable), else the default. API key: NEURON_API_KEY, else the file
    NEURON_API_KEY_FILE names (`neuronctl --key-file` sets it, and unsets NEURON_API_KEY),
    else the config file's (`api_key`, `api_key_file`, or an admin `[[keys]]` entry's file
    or credential this user can read). A named key file that gives no key: KeyFileError.
    """
    # A config being edited (not valid TOML) must not blind the client: what can be read
    # of it is used, the daemon's own note says where it listens, and the operator is told.
    problems: list[str] = []
    settings = settings_for(config_path, problems)
    # Where the key came from, said when the node refuses it: $NEURON_API_KEY silently
    # overrides a config's right key.
    env_file = os.environ.get("NEURON_API_KEY_FILE")
    key_source: str | None
    if os.environ.get("NEURON_API_KEY"):
        key: str | None = os.environ["NEURON_API_KEY"]
        key_source = "$NEURON_API_KEY (it overrides the config's key)"
    elif env_file:
        key = read_named_key(Path(env_file), f"NEURON_API_KEY_FILE={env_file}")
        key_source = f"the key file {env_file}"
    else:
        key = settings.api_key if settings else None
        key_source = "the config file" if key else None
    url = url or os.environ.get("NEURON_URL")
    if url:
        url = normalize_url(url)
        # The URL where this config's daemon will listen: a daemon still activating its
        # models is said to be starting (its note in state_dir), as with --config alone.
        mine = settings is not None and config_path is not None and url == local_url(
            settings.host, _env_port() or settings.port)
        client = Client(url, timeout_s, key, settings.state_dir if mine and settings else None)
    else:
        settings = settings or ClientSettings(state_dir=NeuronConfig.state_dir)
        # NEURON_PORT overrides the config's port for the daemon, so for its clients too.
        port = _env_port() or settings.port
        client = Client(local_url(settings.host, port), timeout_s, key, settings.state_dir)
        if _env_port() is None:
            _follow_listening(client, settings.state_dir, _config_used(config_path))
    client.key_source = key_source
    client.key_hint = _key_hint(settings, problems)
    if problems:
        client.warning = (f"{problems[0]}; asking the node at {client.url} anyway (a reload "
                          "would refuse this file)")
    return client


def _key_hint(settings: ClientSettings | None, problems: list[str]) -> str:
    """What a 401 without a key is told: where the key was looked for and why it was not
    found there, never "pass the --config" to one who did."""
    if settings is None or settings.source is None:
        return KEY_HINT
    why = f" ({settings.key_problem})" if settings.key_problem else ""
    if problems:
        return (f"no key found: {problems[0]}, and what could be read of it names no key "
                f"this user can read{why}; fix the file, or {_OTHER_WAYS}")
    return (f"{settings.source} names no key this user can read{why}: api_key, "
            f"api_key_file or an admin [[keys]] entry's file; {_OTHER_WAYS}")


def _config_used(config_path: Path | None) -> Path | None:
    if config_path is not None:
        return config_path.resolve()
    return DEFAULT_CONFIG_PATH if os.access(DEFAULT_CONFIG_PATH, os.R_OK) else None


def _follow_listening(client: Client, state_dir: Path | None, config: Path | None) -> None:
    """Reach the daemon where it listens when that is not where this config says: the
    config's port was edited and no restart applied it yet, or it was started with --port.
    Only the daemon started from this very config file, on the same host, is followed."""
    running = read_listening(state_dir) if state_dir is not None else None
    if running is None or running.url == client.url or config is None:
        return
    if running.config != str(config):
        return  # another node's config that shares the state_dir, or no config at all
    host = urllib.parse.urlsplit(client.url).hostname
    if urllib.parse.urlsplit(running.url).hostname != host:
        return
    client.note = (f"the daemon (pid {running.pid}) started from {config} listens on "
                   f"{running.url}, not {client.url} (started with --port, or the port was "
                   "changed since: a restart applies it)")
    client.url = running.url


def _env_port() -> int | None:
    value = os.environ.get("NEURON_PORT", "").strip()
    return int(value) if value.isdigit() and 1 <= int(value) <= 65535 else None


class Client:
    def __init__(self, url: str, timeout_s: float = 10.0, api_key: str | None = None,
                 state_dir: Path | None = None, key_hint: str = KEY_HINT) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._api_key = api_key
        self.key_hint = key_hint  # said with a 401 when no key was sent
        self._state_dir = state_dir  # known when the URL came from the config
        self.note: str | None = None  # something the operator should know (the CLI says it)
        self.warning: str | None = None  # something wrong the operator should fix
        self.key_source: str | None = None  # where the key sent came from, when known
        self.node_id: str | None = None  # the node's own name, from its last answer

    def _not_running(self) -> DaemonNotRunning:
        starting = read_starting(self._state_dir) if self._state_dir is not None else None
        return DaemonNotRunning(self.url, starting)

    def request(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Any:
        with self._exchange(method, path, body, timeout_s or self.timeout_s) as resp:
            return json.loads(resp.read() or b"null")

    @contextlib.contextmanager
    def _exchange(self, method: str, path: str, body: Any, timeout_s: float,
                  accept: str | None = None) -> Iterator[http.client.HTTPResponse]:
        """The answer to `method path`, open while the caller reads it: the one place that
        builds a request (JSON body, API key) and says why no answer came. ApiError for a
        refusal (the node's message) or no answer within `timeout_s`, DaemonNotRunning when
        nothing listens (refused, or reset before the answer was read)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if accept is not None:
            req.add_header("Accept", accept)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._api_key:
            req.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                self.node_id = resp.headers.get(NODE_HEADER) or self.node_id
                yield resp
        except urllib.error.HTTPError as exc:
            raise self._api_error(exc) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
            # A connect that timed out comes wrapped in a URLError, a read that did bare.
            if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None),
                                                           TimeoutError):
                raise ApiError(0, f"no answer from {self.url} within {timeout_s:g} s") from None
            raise self._not_running() from None

    def _api_error(self, exc: urllib.error.HTTPError) -> ApiError:
        try:
            raw = exc.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            exc.close()  # its connection; left open, a long chat leaks one per refusal
        payload: Any = None
        message = f"HTTP {exc.code} {exc.reason}"
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            payload = json.loads(raw)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and error.get("message"):  # /v1: OpenAI's shape
            message = str(error["message"])
        elif error:
            message = str(error)
        elif exc.code in (404, 405):
            message = (f"{self.url} answered HTTP {exc.code} {exc.reason}, not as a neuron "
                       "node does (no JSON error); is --url the node's address?")
        if exc.code == 401 and not self._api_key:
            message = f"{message} ({self.key_hint})"
        elif exc.code == 401 and self.key_source:
            # A person typed no header: say which key was wrong, not how HTTP sends one.
            message = f"the node refused the API key from {self.key_source}"
        return ApiError(exc.code, message, payload)

    def models(self) -> list[dict[str, Any]]:
        result = self.request("GET", "/models")
        return result if isinstance(result, list) else []

    def load(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        return dict(self.request("POST", "/models/load", spec, timeout_s=timeout_s))

    def unload(self, model_id: str) -> dict[str, Any]:
        return dict(self.request("POST", "/models/unload", {"model_id": model_id}))

    def events(self, read_timeout_s: float = EVENTS_READ_TIMEOUT_S) -> Iterator[Event]:
        """`GET /models/events` as (event, data) pairs as they come, the snapshot first;
        it returns when the daemon ends the stream (it is stopping)."""
        return self.stream("GET", "/models/events", None, read_timeout_s)

    def stream(self, method: str, path: str, body: Any,
               read_timeout_s: float) -> Iterator[Event]:
        """Server-sent events of `method path` (the events stream, a streamed /v1 answer)
        as they come; `read_timeout_s` bounds each wait for the next bytes."""
        with self._exchange(method, path, body, read_timeout_s, "text/event-stream") as resp:
            try:
                yield from read_events(resp)
            except TimeoutError:
                raise ApiError(0, f"{self.url} sent nothing, not even a keep-alive, for "
                               f"{read_timeout_s:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise ApiError(0, f"lost the connection to {self.url} "
                               f"({type(exc).__name__})") from None


def read_events(lines: Iterable[bytes]) -> Iterator[Event]:
    """Server-sent events from `lines`, each (event, data) with `data` decoded from JSON;
    comments (the keep-alives) are skipped."""
    name, data = "message", list[str]()
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:  # the blank line that ends an event
            if data:
                text = "\n".join(data)
                try:
                    yield name, json.loads(text)
                except json.JSONDecodeError:
                    yield name, text
            name, data = "message", list[str]()
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
