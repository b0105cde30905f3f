"""The model store's commands without the daemon: `python -m neuronctl.models.storetool VERB`.

The CLI never imports the daemon side (docs/architecture.md), so `neuronctl pull`,
`models`, `show` and `rm` run this module in a child process and read its answer: one JSON
object per line on stdout (a pull's progress as it goes, then its outcome). Being a process
of its own is also how a pull run as root writes the cache as the daemon's user: the CLI
starts it with that user's ids (cli/store.py), and every file it makes is theirs.

  pull [--config F] [--all] NAME...     download (progress lines, then one per model)
  ls [--config F]                       what the caches and local paths hold
  show [--config F] NAME|PATH           header facts and the VRAM verdict per GPU
  rm [--config F] [--force] [--loaded ID]... NAME   remove cached files
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ModelSpec,
    NeuronConfig,
    config_from_env,
    load_config,
)
from ..errors import EX_CONFIG, NeuronError
from . import facts, store
from .discovery import Discovery
from .gguf import BadHeader, CannotEstimate
from .hub import Fetcher, Progress, ResolveError, from_hub, hf_offline

PROGRESS_EVERY_S = 0.25


PARENT_ENV = "NEURONCTL_STORE_PARENT"


def emit(obj: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the CLI is gone: nobody reads on, stop (a pull resumes later)
        os._exit(141)


def _die_with_parent() -> None:
    """SIGTERM when the CLI that started us dies (a killed terminal, say): a pull nobody
    watches stops, and its partial file waits for the next pull to resume it."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # it died before prctl took effect
        os._exit(143)


def read_config(path: Path | None) -> NeuronConfig:
    """The file named, else the default one where it exists, else the environment's."""
    if path is not None or DEFAULT_CONFIG_PATH.exists():
        return load_config(path)
    return config_from_env()


def pull_targets(config: NeuronConfig, names: list[str], every: bool) -> list[ModelSpec]:
    specs = [s for s in config.catalogue().values() if from_hub(s)] if every else []
    for name in names:
        spec = store.spec_of(config, name)
        if not from_hub(spec):
            raise ValueError(f"{name} has a local path ({spec.path}); there is nothing to pull")
        if spec not in specs:
            specs.append(spec)
    return specs


def _reporter(spec: ModelSpec, progress: Progress) -> Callable[[], None]:
    def report() -> None:
        emit({"event": "progress", "model": spec.model_id, "file": progress.file,
              "file_done_bytes": progress.file_done_bytes,
              "file_total_bytes": progress.file_total_bytes,
              "done_bytes": progress.done_bytes, "total_bytes": progress.total_bytes})
    return report


def pull_one(config: NeuronConfig, spec: ModelSpec,
             fetcher: Callable[[Path | None], Fetcher] = Fetcher) -> bool:
    """One model's download, its progress every PROGRESS_EVERY_S from a thread beside it."""
    cache = config.harness_config(spec.harness).hf_cache
    made = fetcher(cache)
    lines: list[str] = []
    progress = Progress(log=lines.append)
    emit({"event": "start", "model": spec.model_id, "cache": str(made.cache)})
    report = _reporter(spec, progress)
    finished = threading.Event()

    def tick() -> None:
        while not finished.wait(PROGRESS_EVERY_S):
            if progress.file is not None:
                report()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    started = time.monotonic()
    try:
        resolved = made.resolve(spec, progress)
    except NeuronError as exc:
        emit({"event": "failed", "model": spec.model_id, "error": exc.message,
              "code": exc.code})
        return False
    finally:
        finished.set()
        ticker.join()
    if progress.file is not None:
        report()
    emit({"event": "done", "model": spec.model_id, "path": str(resolved.path),
          "parts": len(resolved.parts), "cached": progress.file is None,
          "bytes": progress.done_bytes, "elapsed_s": round(time.monotonic() - started, 3)})
    return True


def show(config: NeuronConfig, name: str) -> dict[str, Any]:
    path = Path(name)
    if name not in config.catalogue() and (name.lower().endswith(".gguf") or path.exists()):
        spec = ModelSpec(path.name, path=path.resolve())
    else:
        spec = store.spec_of(config, name)
    parts = facts.local_parts(config, spec)

    async def run() -> dict[str, Any]:
        discovery = Discovery()
        try:
            gpus = await discovery.refresh()
        finally:
            await discovery.close()
        return await facts.show(config, spec, parts, gpus)

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the CLI says it
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="neuronctl-store")
    parser.add_argument("verb", choices=("pull", "ls", "show", "rm"))
    parser.add_argument("names", nargs="*")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--loaded", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        emit({"error": f"config error: {exc}", "code": "invalid_config"})
        return EX_CONFIG
    try:
        if args.verb == "pull":
            specs = pull_targets(config, args.names, args.all)
            if not specs:
                emit({"error": "nothing to pull: name a model, or --all with Hugging Face "
                               "models in the config", "code": "nothing_to_pull"})
                return 2
            if hf_offline():
                emit({"event": "note", "message": "HF_HUB_OFFLINE=1: only the cache is "
                                                  "searched"})
            ok = [pull_one(config, spec) for spec in specs]
            return 0 if all(ok) else 1
        if args.verb == "ls":
            emit(store.listing(config, args.loaded))
            return 0
        if len(args.names) != 1:
            emit({"error": f"{args.verb} takes one model", "code": "bad_arguments"})
            return 2
        if args.verb == "show":
            emit({"show": show(config, args.names[0])})
            return 0
        return _rm(config, args.names[0], args.force, args.loaded)
    except (BadHeader, CannotEstimate) as exc:  # before ValueError: BadHeader is one
        emit({"error": f"{args.names[0]}: cannot read its GGUF header: {exc}",
              "code": "bad_header"})
        return 1
    except (ValueError, ResolveError) as exc:
        emit({"error": str(exc) if isinstance(exc, ValueError) else exc.message,
              "code": "bad_model"})
        return 1
    except NeuronError as exc:
        emit({"error": exc.message, "code": exc.code})
        return 1
    except OSError as exc:  # a cache this user may not read or change (root's, say)
        where = f" {exc.filename}" if exc.filename else ""
        emit({"error": f"{args.verb}: cannot use{where}: {exc.strerror or exc}",
              "code": "os_error"})
        return 1


def _rm(config: NeuronConfig, name: str, force: bool, loaded: list[str]) -> int:
    found = store.matching(config, name)
    if not found:
        emit({"error": f"{name}: nothing of it in the cache", "code": "not_cached"})
        return 1
    blocked = store.blocked_by(config, found, loaded)
    if blocked and not force:
        emit({"error": f"refusing to remove {name}: {'; '.join(blocked)} (--force removes "
                       "it all the same)", "code": "in_use"})
        return 1
    emit({"removal": store.remove(found).as_json()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
