"""The files stage of a load: the local GGUF a worker is started on.

A `path` is checked again at every start (a file deleted since the last one fails the
start, not the worker); a Hugging Face model is found in the cache or downloaded, in a
thread of its own, with its progress in the model's log. hub.py knows the Hub; this
module only runs it for one load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from .. import logfiles
from ..aio import in_thread
from ..config import HarnessConfig, ModelSpec
from ..errors import InternalError, LoadError
from . import hub as resolve

log = logging.getLogger(__name__)

FetcherFactory = Callable[[HarnessConfig], resolve.Fetcher]


def default_fetcher(defaults: HarnessConfig) -> resolve.Fetcher:
    return resolve.Fetcher(defaults.hf_cache)


async def download(
    spec: ModelSpec,
    fetcher_factory: FetcherFactory,
    defaults: HarnessConfig,
    log_path: Path,
    log_keep: int,
    progress: resolve.Progress,
) -> resolve.Resolved:
    """Resolve a Hugging Face model to local files, fetching what the cache lacks. The
    model's log is rotated here (the first start then appends to it), and `progress`
    writes its lines there (see `append_line`). Cancelling returns
    at once; the thread stops at its next chunk."""
    try:
        fetcher = fetcher_factory(defaults)
    except Exception as exc:  # a bug, or huggingface_hub missing
        log.exception("%s: cannot set up the download", spec.model_id)
        raise InternalError(f"cannot fetch {spec.model_id}: {exc}") from exc
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logfiles.rotate(log_path, log_keep)
    except OSError as exc:  # the worker's start says so again, and goes on without it
        log.warning("%s: cannot rotate the log %s: %s", spec.model_id, log_path, exc.strerror)
    log.info("%s: finding its GGUF in the Hugging Face cache %s, or downloading it",
             spec.model_id, fetcher.cache)
    try:
        resolved = await in_thread(lambda: fetcher.resolve(spec, progress),
                                   f"download {spec.model_id}")
    except asyncio.CancelledError:
        progress.cancel()
        raise
    except LoadError:
        raise
    except Exception as exc:  # a bug, or huggingface_hub surprising us
        log.exception("%s: download failed", spec.model_id)
        raise InternalError(f"cannot fetch {spec.model_id}: {exc}") from exc
    log.info("%s: model file %s", spec.model_id, resolved.path)
    return resolved


def run_spec(
    spec: ModelSpec, resolved: resolve.Resolved | None, needs_file: bool
) -> tuple[ModelSpec, resolve.Resolved | None, tuple[Path, ...]]:
    """The spec a worker is planned from (its local file filled in), what it resolved to,
    and the GGUF parts whose headers size it. Raises ModelFileError for a missing `path`."""
    if needs_file and spec.path is not None:
        resolved = resolve.local_file(spec)
    if resolved is not None:
        return dataclasses.replace(spec, path=resolved.path), resolved, resolved.parts
    parts = (spec.path,) if spec.path is not None and _is_file(spec.path) else ()
    return spec, None, parts


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, say: Python 3.11 raises for it
        return False


def append_line(path: Path, line: str) -> None:
    """One line to a model's log, from any thread (download progress); never through a
    symlink planted in log_dir (see logfiles.open_log)."""
    logfiles.append_line(path, line, create=True)
