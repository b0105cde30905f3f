"""`neuronctl check [--config F]`: validate a config without starting anything, for
`ExecStartPre=` and CI (`nginx -t`): every problem at once, one line each, and an exit
status that says valid (0) or not (78, as `start` refuses it).

Beyond what `start` checks (the file, every key, the harness tables), it looks at what
`start` finds only at the first load: that each catalogue model's `path` is a file, and that
each harness a model uses can run here, whatever else is wrong (a problem that stops the
round leaves the model and harness tables checked alone). Its own module of the daemon side,
as `start` is: it needs the harnesses, which the CLI never imports.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    NeuronConfig,
    apply_env_overrides,
    config_from_mapping,
    tomllib,  # the standard one, or tomli before Python 3.11
)
from ..errors import EX_CONFIG

# Past this many, the rest is noise: the first ones say what to fix.
MAX_PROBLEMS = 50
_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronctl check",
        description="Validate a config without starting anything: every problem, one line "
                    "each; exit 0 when it is valid, 78 when not.")
    env_config = os.environ.get("NEURON_CONFIG")
    parser.add_argument("--config", "-c", type=Path,
                        default=Path(env_config) if env_config else None,
                        help=f"config file (default: $NEURON_CONFIG, else {DEFAULT_CONFIG_PATH})")
    return parser


def _parts(key: str) -> list[str | int]:
    return [int(index) if index else name for name, index in _PART.findall(key)]


def _drop(raw: dict[str, Any], key: str, whole_entry: bool) -> bool:
    """Take what `key` names out of `raw` (or, with `whole_entry`, the entry that holds it:
    the item of a top-level array such as `[[models]]`, else the table or array holding
    the value), so the next validation goes past it; False when nothing was there."""
    parts = _parts(key)
    entry = len(parts) == 2 and isinstance(parts[1], int)  # `keys[0]` is an entry itself
    if whole_entry and len(parts) > 1 and not entry:
        parts = parts[:-1]
    node: Any = raw
    for part in parts[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    last = parts[-1] if parts else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list) and isinstance(last, int) and last < len(node) \
            and node[last] is not None:
        node[last] = None  # keeps the indexes of the items after it
        return True
    return False


def _validate(raw: dict[str, Any], base_dir: Path) -> NeuronConfig:
    """What `start` refuses: the config's own checks, then the harness tables and each
    model's `args` as the harnesses read them (unknown harness names, reserved flags)."""
    from ..supervisor.harness import build_harnesses

    cleaned = {k: ([item for item in v if item is not None] if isinstance(v, list) else v)
               for k, v in raw.items()}
    config = config_from_mapping(cleaned, base_dir=base_dir)
    build_harnesses(config)
    return config


def _consequence(exc: ConfigError, key: str, dropped: set[str]) -> bool:
    """Whether `exc` (at `key`, the file's indexes) only follows from what was dropped
    before: the same key "missing" now, or the entry that held a dropped field incomplete
    without it (a `[[keys]]` entry whose unreadable `file` was dropped now has "none of
    sha256, file or credential") — not a problem of its own."""
    if key in dropped:
        return True
    return any(d.startswith(key + ".") and re.search(rf"\b{re.escape(d[len(key) + 1:])}\b",
                                                     exc.message)
               for d in dropped)


class Problems:
    """Every problem of a parsed config file: validated again and again, each time without
    what the last problem named, keys reported with the file's indexes (a dropped
    `[[models]]` entry does not renumber the ones after it)."""

    def __init__(self, raw: dict[str, Any], base_dir: Path) -> None:
        self.raw = raw
        self.base_dir = base_dir
        self.found: list[ConfigError] = []

    def validate(self) -> NeuronConfig | None:
        """The config once nothing is left to drop; None when a problem could not be
        stepped over (a relation between two keys where one is a default, say)."""
        dropped: set[str] = set()
        # Each round drops something, each problem costs at most a few rounds.
        for _ in range(4 * MAX_PROBLEMS):
            if len(self.found) >= MAX_PROBLEMS:
                return None
            try:
                return _validate(self.raw, self.base_dir)
            except ConfigError as exc:
                key = self.file_key(exc.key)
                again = _consequence(exc, key, dropped)
                if not again:
                    exc.key = key
                    self.found.append(exc)
                dropped.add(key)
                if not (_drop(self.raw, key, whole_entry=again)
                        or _drop(self.raw, key, whole_entry=True)
                        or self._drop_named(exc.message)):
                    return None
        return None

    def _drop_named(self, message: str) -> bool:
        """A relation to a key left at its default (`max_queued_bytes: must be at least
        max_request_bytes`): the other side, the top-level key the message names, is
        dropped instead."""
        for name in re.findall(r"[a-z][a-z0-9_]*", message):
            if name in self.raw and not isinstance(self.raw[name], (dict, list)):
                del self.raw[name]
                return True
        return False

    def file_key(self, key: str) -> str:
        """`key` (as validation names it, dropped items gone) with the file's indexes."""
        match = re.match(r"(\w+)\[(\d+)\](.*)", key, re.DOTALL)
        if not match or not isinstance(self.raw.get(match[1]), list):
            return key
        wanted, seen = int(match[2]), -1
        for i, item in enumerate(self.raw[match[1]]):
            if item is not None:
                seen += 1
                if seen == wanted:
                    return f"{match[1]}[{i}]{match[3]}"
        return key


def config_problems(raw: dict[str, Any], base_dir: Path) -> tuple[NeuronConfig | None,
                                                                    list[ConfigError]]:
    """Every problem of a parsed config file, then what only a load would find (model files,
    harness programs): for the config once every problem is stepped over or, where one
    could not be, for its model and harness tables alone, so a problem elsewhere never
    hides a missing file."""
    tables = {k: copy.deepcopy(raw[k]) for k in _RUNTIME_TABLES if k in raw}
    problems = Problems(raw, base_dir)
    config = problems.validate()
    if config is not None:
        return config, problems.found + _runtime_problems(config, problems.file_key)
    if tables:
        # The tables alone: what they find that the whole file's round did not reach is
        # said too, and their files and programs are checked.
        alone = Problems(tables, base_dir)
        for_paths = alone.validate()
        reported = {str(p) for p in problems.found}
        problems.found += [p for p in alone.found if str(p) not in reported]
        if for_paths is not None:
            problems.found += _runtime_problems(for_paths, alone.file_key)
    return None, problems.found


# The tables that say which files and programs a load needs.
_RUNTIME_TABLES = ("default_models", "models", "harness")


def _runtime_problems(config: NeuronConfig, file_key: Callable[[str], str]
                      ) -> list[ConfigError]:
    """What only a load would find: catalogue files that are not there, harnesses that
    cannot run here."""
    from ..supervisor.harness import build_harnesses, unavailable

    problems: list[ConfigError] = []
    harnesses = build_harnesses(config)  # validated already
    used: dict[str, str] = {}
    for table, specs in (("default_models", config.default_models), ("models", config.models)):
        for i, spec in enumerate(specs):
            key = file_key(f"{table}[{i}]")
            used.setdefault(spec.harness, f"{key}.harness")
            if spec.path is not None and not spec.path.is_file():
                what = "is a directory, not a GGUF file" if spec.path.is_dir() else "not found"
                problems.append(ConfigError(f"{key}.path", f"model file {what}: {spec.path}"))
    for name, key in used.items():
        harness = harnesses.get(name)
        why = unavailable(harness) if harness is not None else None
        if why is not None:
            problems.append(ConfigError(key, f"harness {name} cannot run here: {why}"))
    return problems


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    path: Path = args.config or DEFAULT_CONFIG_PATH
    config, problems = _read(path)
    for problem in problems:
        problem.source = problem.source or str(path)
        sys.stderr.write(f"neuronctl: config error: {problem}\n")
    if problems:
        more = " (or more: the first 50 shown)" if len(problems) >= MAX_PROBLEMS else ""
        sys.stdout.write(f"{path}: {len(problems)} problem{'s' * (len(problems) != 1)}"
                         f"{more}\n")
        return EX_CONFIG
    assert config is not None
    sys.stdout.write(f"{path}: valid ({len(config.default_models)} default, "
                     f"{len(config.models)} catalogue model"
                     f"{'s' * (len(config.models) != 1)})\n")
    return 0


def _read(path: Path) -> tuple[NeuronConfig | None, list[ConfigError]]:
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [ConfigError("", "config file not found (neuronctl check --config FILE; "
                                      "config/neuron.example.toml shows every key)", source)]
    except UnicodeDecodeError as exc:
        return None, [ConfigError("", f"not UTF-8 text (byte {exc.start})", source)]
    except OSError as exc:
        return None, [ConfigError("", f"cannot read config file: {exc.strerror}", source)]
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        return None, [ConfigError("", f"invalid TOML: {exc}", source)]
    env_keys = apply_env_overrides(raw, os.environ)
    config, problems = config_problems(raw, path.parent.resolve())
    for problem in problems:
        top = problem.key.split(".")[0].split("[")[0]
        var = env_keys.get(problem.key) or env_keys.get(top)
        problem.source = f"environment {var}" if var else source
    return config, problems
