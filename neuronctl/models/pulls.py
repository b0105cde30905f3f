"""Downloads without a load: `POST /models/pull` and `prefetch = true`.

One download at a time, in a thread of its own at the lowest CPU priority (nice 19 on
that thread alone: Linux schedules threads one by one), so a pull never competes with
the loads and requests the node serves. What each pull is doing is kept (the newest 32
finished ones besides those waiting or running) for `/models`, `status` and the event
stream. The download itself is hub.py's `Fetcher.resolve`, as a load's: the cache first,
the space check, resumable blobs.

Each change of a pull's state (queued, downloading, done, failed) is told to the watchers
(`watch`) as it happens, so a reader such as the event stream shows every pull's start
and end, however quickly it ran; its bytes in between are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..aio import in_thread
from ..config import HarnessConfig, ModelSpec
from ..errors import NeuronError
from .hub import DownloadCancelled, Fetcher, Progress, from_hub

log = logging.getLogger(__name__)

KEEP_FINISHED = 32
QUEUED, DOWNLOADING, DONE, FAILED = "queued", "downloading", "done", "failed"

FetcherFactory = Callable[[HarnessConfig], Fetcher]
Watcher = Callable[["Pull"], None]


class Pull:
    """One model's download: who asked (`client` or `prefetch`), how far, how it ended."""

    def __init__(self, spec: ModelSpec, by: str) -> None:
        self.spec = spec
        self.by = by
        self.state = QUEUED
        self.progress = Progress(log=lambda line: log.debug("%s: %s", spec.model_id, line))
        self.error: str | None = None
        self.code: str | None = None
        self.failure: NeuronError | None = None  # what a client waiting for it is answered
        self.path: str | None = None
        self.queued_at = time.time()
        self.finished_at: float | None = None
        self.done = asyncio.Event()

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def as_json(self) -> dict[str, Any]:
        progress = self.progress
        return {
            "model": self.model_id, "state": self.state, "by": self.by,
            "file": progress.file, "file_done_bytes": progress.file_done_bytes
            if self.state == DOWNLOADING else None,
            "file_total_bytes": progress.file_total_bytes,
            "done_bytes": progress.done_bytes, "total_bytes": progress.total_bytes,
            "path": self.path, "error": self.error, "code": self.code,
            "queued_at": self.queued_at, "finished_at": self.finished_at,
        }


def _lowest_priority() -> None:
    """This thread only at nice 19 (Linux: a thread id is a PRIO_PROCESS target)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Pulls:
    """The node's downloads without loads, one at a time, in the order they were asked
    for. `harness_config` gives a harness's settings now (its `hf_cache`), a reload
    included; `fetcher_factory` makes the Fetcher (tests give a fake Hub's)."""

    def __init__(self, harness_config: Callable[[str], HarnessConfig],
                 fetcher_factory: FetcherFactory) -> None:
        self._harness_config = harness_config
        self._fetcher_factory = fetcher_factory
        self._pulls: OrderedDict[str, Pull] = OrderedDict()
        self._queue: asyncio.Queue[Pull] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._current: Pull | None = None
        self._watchers: list[Watcher] = []

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher` with a pull each time its state changes, in the event loop's
        thread, from now on; returns the call that stops it."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def _changed(self, pull: Pull) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(pull)
            except Exception:  # one broken reader must not stop a download
                log.exception("pull watcher %r failed on %s", watcher, pull.model_id)

    def get(self, model_id: str) -> Pull | None:
        return self._pulls.get(model_id)

    def all(self) -> list[Pull]:
        return list(self._pulls.values())

    def request(self, spec: ModelSpec, by: str = "client") -> Pull:
        """Queue `spec`'s download, or the pull of it already waiting or running."""
        if not from_hub(spec):
            raise ValueError(f"{spec.model_id} has a local path; there is nothing to pull")
        pending = self._pulls.get(spec.model_id)
        if pending is not None and pending.state in (QUEUED, DOWNLOADING):
            return pending
        pull = Pull(spec, by)
        self._pulls.pop(spec.model_id, None)
        self._pulls[spec.model_id] = pull
        self._trim()
        if self._queue is None:
            self._queue = asyncio.Queue()
        self._queue.put_nowait(pull)
        self._changed(pull)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="pulls")
        return pull

    def prefetch(self, specs: Iterable[ModelSpec]) -> list[Pull]:
        """The catalogue's Hugging Face models, queued behind whatever is asked already."""
        return [self.request(spec, "prefetch") for spec in specs if from_hub(spec)]

    def _trim(self) -> None:
        finished = [k for k, p in self._pulls.items() if p.state in (DONE, FAILED)]
        for key in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._pulls[key]

    async def _run(self) -> None:
        assert self._queue is not None
        while not self._queue.empty():
            pull = self._queue.get_nowait()
            if pull.state != QUEUED:
                continue
            self._current = pull
            try:
                await self._download(pull)
            finally:
                self._current = None
                pull.finished_at = time.time()
                pull.done.set()
                self._trim()
                self._changed(pull)

    async def _download(self, pull: Pull) -> None:
        spec = pull.spec
        pull.state = DOWNLOADING
        self._changed(pull)
        try:
            fetcher = self._fetcher_factory(self._harness_config(spec.harness))

            def fetch() -> str:
                _lowest_priority()
                return str(fetcher.resolve(spec, pull.progress).path)

            pull.path = await in_thread(fetch, f"pull {spec.model_id}")
        except asyncio.CancelledError:
            pull.progress.cancel()
            pull.state, pull.error = FAILED, "cancelled: the node is stopping"
            raise
        except DownloadCancelled:
            pull.state, pull.error = FAILED, "cancelled"
        except NeuronError as exc:
            pull.state, pull.error, pull.code = FAILED, exc.message, exc.code
            pull.failure = exc
            log.warning("pull of %s failed: %s", spec.model_id, exc.message)
        except Exception as exc:  # a bug, or huggingface_hub surprising us
            log.exception("pull of %s failed", spec.model_id)
            pull.state, pull.error = FAILED, f"unexpected error: {exc!r}"
        else:
            pull.state = DONE
            log.info("pulled %s (%s, by %s)", spec.model_id, pull.path, pull.by)

    async def close(self) -> None:
        """Stop at shutdown: the running download stops at its next chunk (its partial file
        stays, for the next pull to resume), the queued ones are dropped."""
        for pull in self._pulls.values():
            if pull.state == QUEUED:
                pull.state, pull.error = FAILED, "cancelled: the node is stopping"
                pull.finished_at = time.time()
                pull.done.set()
                self._changed(pull)
        if self._current is not None:
            self._current.progress.cancel()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
