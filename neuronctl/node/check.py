"""`neuronctl check [--config F]`: validate a config without starting anything, for
`ExecStartPre=` and CI (`nginx -t`): every problem at once, one line each, and an exit
status that says valid (0) or not (78, as `start` refuses it).

Beyond what `start` checks (the file, every key, the harness tables), it looks at what
`start` finds only at the first load: that each catalogue model's `path` is a file, and that
each harness a model uses can run here. Its own module of the daemon side, as `start` is:
it needs the harnesses, which the CLI never imports.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
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
    """Take what `key` names out of `raw` (or, with `whole_entry`, the table or array item
    that holds it), so the next validation goes past it; False when nothing was there."""
    parts = _parts(key)
    if whole_entry and len(parts) > 1:
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
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = None  # keeps the indexes of the items after it
        return True
    return False


def config_problems(raw: dict[str, Any], base_dir: Path) -> tuple[NeuronConfig | None,
                                                                    list[ConfigError]]:
    """Every problem of a parsed config file: validated again and again, each time without
    what the last problem named. The config once nothing is left to drop (None when a
    problem could not be stepped over)."""
    problems: list[ConfigError] = []
    dropped: set[str] = set()
    while len(problems) < MAX_PROBLEMS:
        cleaned = {k: ([item for item in v if item is not None] if isinstance(v, list) else v)
                   for k, v in raw.items()}
        try:
            return config_from_mapping(cleaned, base_dir=base_dir), problems
        except ConfigError as exc:
            # A key dropped before and now "missing" is the same problem again.
            again = exc.key in dropped
            if not again:
                problems.append(exc)
            dropped.add(exc.key)
            # Indexes are the file's: dropped items are None until validation.
            key = _file_key(raw, exc.key)
            if not (_drop(raw, key, whole_entry=again) or _drop(raw, key, whole_entry=True)):
                return None, problems
    return None, problems


def _file_key(raw: dict[str, Any], key: str) -> str:
    """`key` (as validation names it, dropped items gone) with the file's indexes."""
    match = re.match(r"(\w+)\[(\d+)\](.*)", key)
    if not match or not isinstance(raw.get(match[1]), list):
        return key
    wanted, seen = int(match[2]), -1
    for i, item in enumerate(raw[match[1]]):
        if item is not None:
            seen += 1
            if seen == wanted:
                return f"{match[1]}[{i}]{match[3]}"
    return key


def _runtime_problems(config: NeuronConfig) -> list[ConfigError]:
    """What only a load would find: catalogue files that are not there, harnesses that
    cannot run here."""
    from ..supervisor.harness import build_harnesses, unavailable

    problems: list[ConfigError] = []
    try:
        harnesses = build_harnesses(config)
    except ConfigError as exc:
        return [exc]
    used: dict[str, str] = {}
    for table, specs in (("default_models", config.default_models), ("models", config.models)):
        for i, spec in enumerate(specs):
            key = f"{table}[{i}]"
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
    if config is not None:
        problems += _runtime_problems(config)
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
