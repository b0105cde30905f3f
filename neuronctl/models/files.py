"""The files stage of a load: the local GGUF a worker is started on.

A `path` is checked here again at every start (a file deleted since the last one fails
the start, not the worker; a device or a FIFO is refused, never read from); a Hugging Face
model is found in the cache or downloaded, in a thread of its own, with its progress in
the model's log. hub.py knows the Hub; this module only runs it for one load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .. import logfiles
from ..aio import in_thread
from ..config import HarnessConfig, ModelSpec
from ..errors import InternalError, LoadError, clip
from ..fsutil import NotRegularFile, open_regular
from . import hub as resolve
from .hub import Resolved, ResolveError

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
) -> Resolved:
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
    except LoadError as exc:
        # `neuronctl logs MODEL` says why, a listing that failed before any progress too.
        append_line(log_path, f"download failed: {exc.message}")
        raise
    except Exception as exc:  # a bug, or huggingface_hub surprising us
        log.exception("%s: download failed", spec.model_id)
        raise InternalError(f"cannot fetch {spec.model_id}: {exc}") from exc
    log.info("%s: model file %s", spec.model_id, resolved.path)
    return resolved


def run_spec(
    spec: ModelSpec, resolved: Resolved | None, needs_file: bool
) -> tuple[ModelSpec, Resolved | None, tuple[Path, ...]]:
    """The spec a worker is planned from (its local file filled in), what it resolved to,
    and the GGUF parts whose headers size it. Raises ModelFileError for a missing `path`."""
    if needs_file and spec.path is not None:
        resolved = local_file(spec)
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


def local_file(spec: ModelSpec) -> Resolved:
    """The entry's own `path`; a clear error when it is not a GGUF file."""
    assert spec.path is not None
    parts = _split_parts(spec.path)
    for part in parts:
        check_model_file(part)
    return Resolved(spec.path, parts, str(spec.path))


GGUF_MAGIC = b"GGUF"


def check_model_file(path: Path) -> None:
    """A ModelFileError unless `path` is a regular file that starts like a GGUF. Opened
    without blocking and checked with fstat before anything is read, so a FIFO or a
    device (`/dev/zero`) is refused rather than read from; a symlink is followed (a model
    file often is one, into a cache).

    A client names the path, so the answer says no more than an operator needs: never
    the bytes it read (`/etc/shadow` would answer `b'root'`), and a missing file and one
    this user may not read alike."""
    try:
        fd = open_regular(path, follow_symlinks=True)
    except NotRegularFile as exc:
        if exc.kind == "a directory":
            raise ResolveError(
                f"model path is a directory, not a GGUF file: {clip(path)}") from None
        raise ResolveError(f"model path is not a regular file (a device, FIFO or "
                           f"socket): {clip(path)}") from None
    except (FileNotFoundError, PermissionError):
        raise ResolveError(f"model file not found or not readable: {clip(path)}") from None
    except IsADirectoryError:
        raise ResolveError(
            f"model path is a directory, not a GGUF file: {clip(path)}") from None
    except OSError as exc:
        raise ResolveError(
            f"cannot open model file {clip(path)}: {exc.strerror}") from None
    try:
        try:
            magic = os.pread(fd, len(GGUF_MAGIC), 0)
        except OSError as exc:
            raise ResolveError(
                f"cannot read model file {clip(path)}: {exc.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ResolveError(f"not a GGUF file (no GGUF magic): {clip(path)}")
    finally:
        os.close(fd)


def _split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split model given its first, for a local path."""
    match = resolve.SPLIT_NAME.match(path.name)
    if not match:
        return (path,)
    count = int(match["count"])
    return tuple(
        path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    )
