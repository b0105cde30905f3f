"""The model store's child process (`python -m neuronctl.models.storetool`), for `pull`,
`models`, `show` and `rm` when the daemon does not answer: the CLI never imports the daemon
side, so the work runs there, and its JSON lines come back here.

Run as root, the child takes the ids of the user who owns the config's `state_dir` (the
daemon's user: it writes its state there), so what a pull writes into the cache is the
daemon's to read and to remove, never root's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CONFIG_PATH, ConfigError, NeuronConfig, config_from_env, load_config
from ..errors import EX_CONFIG, fail

MODULE = "neuronctl.models.storetool"


def read_config(path: Path | None) -> NeuronConfig:
    """The config the child will read: the file named, else the default one where it
    exists, else the environment's; a bad one is one line and EX_CONFIG."""
    try:
        if path is not None or DEFAULT_CONFIG_PATH.exists():
            return load_config(path)
        return config_from_env()
    except ConfigError as exc:
        fail(f"config error: {exc}", EX_CONFIG)


def owner_of(path: Path) -> tuple[int, int] | None:
    """(uid, gid) of `path`, or of its nearest existing folder."""
    for where in (path, *path.parents):
        try:
            st = where.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return None
        return st.st_uid, st.st_gid
    return None


def run_as(config: NeuronConfig, euid: int | None = None) -> tuple[int, int] | None:
    """The ids the child takes: the daemon's user when we are root and it is another."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    owner = owner_of(config.state_dir)
    return owner if owner is not None and owner[0] != 0 else None


def _environment(ids: tuple[int, int] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["NEURONCTL_STORE_PARENT"] = str(os.getpid())  # the child dies with us (storetool.py)
    # The child must import this very package, wherever it was run from (a checkout too).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH"))
                                        if p)
    if ids is not None:
        # A default cache (~/.cache/huggingface) is then the daemon user's own.
        with contextlib.suppress(KeyError):
            env["HOME"] = pwd.getpwuid(ids[0]).pw_dir
    return env


def run(verb: str, args: list[str], config_path: Path | None,
        ids: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
    """The child's JSON lines as they come; its exit status is the last item's `"exit"`."""
    argv = [sys.executable, "-m", MODULE, verb, *args]
    if config_path is not None:
        argv += ["--config", str(config_path.resolve())]
    user: dict[str, Any] = {}
    if ids is not None:
        user = {"user": ids[0], "group": ids[1], "extra_groups": []}
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=_environment(ids), cwd="/", **user)
    except OSError as exc:
        fail(f"cannot start {MODULE}: {exc}")
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a library's print; the child's answers are JSON
            if isinstance(line, dict):
                yield line
    finally:
        proc.stdout.close()
        code = proc.wait()
    yield {"exit": code}
