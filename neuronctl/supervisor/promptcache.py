"""Prompt caches that survive a swap: what a worker's slots hold, saved when its model is
stopped on purpose and restored when the model is next loaded, before it is `loaded`, so a
returning conversation's first token costs a restore (milliseconds), not a prefill
(seconds per thousand tokens on a CPU).

llama-server only (`Harness.keeps_prompt_cache`): its worker runs with `--slot-save-path`
(and `--swa-full` for a model with sliding-window layers, whose restored cache is otherwise
reported restored and then not reused), and every slot `GET /slots` lists is saved with
`POST /slots/{id}?action=save`, one file per slot, in the model's own directory under
`state_dir/prompt-cache/`. A `manifest.json` beside the files says what they belong to
(`CacheKey`: the exact model file, n_ctx, slots, harness, --swa-full); a cache whose key
differs from the worker's is discarded, with a journal line saying what changed.

Nothing here may fail a load or hold up a stop: a save is bounded by
`prompt_cache_save_timeout_s` (past it, it gives up and says so), a full disk or an
unwritable directory is a warning and a worker without a cache, a file the worker refuses
is discarded. Bytes on disk are bounded per model and node-wide (`prompt_cache_model_bytes`,
`prompt_cache_bytes`), least recently used files removed first (`over_budget`).
A restore is judged by the next answer (`Session.observe`): llama-server's `timings.cache_n`
says how many prompt tokens it reused; none is logged and counted (`misses`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import fsutil
from ..config import ModelSpec, NeuronConfig, effective
from ..units import plural
from . import slotapi

log = logging.getLogger("neuronctl.models")

CACHE_DIR = "prompt-cache"  # under state_dir
MANIFEST = "manifest.json"
_SLOT_FILE = re.compile(r"slot-(\d{1,6})\.bin")
_MANIFEST_LIMIT = 1024 * 1024
# Below this much free space on the cache's file system a save is not tried: a disk filled
# by caches would fail writes that matter more (logs, workers.json).
MIN_FREE_BYTES = 256 * 1024 * 1024
# A restore reads files a save wrote within its own timeout; this bounds a worker that
# stalls instead (the load waits for it, so it is generous but finite).
RESTORE_TIMEOUT_S = 30.0
# A slot holding fewer tokens than this is not kept: its prefill costs less than its file
# (measured with llama-server on the tiny model: a restored slot made the next, unrelated
# answer 2.5 ms slower, and the restore itself took about 1 ms; a prefill of 64 tokens is
# a few milliseconds on a GPU). A conversation worth a cache is hundreds of tokens long.
MIN_SAVED_TOKENS = 64
_CACHE_N = re.compile(rb'"cache_n"\s*:\s*(\d+)')
_KEEP_TAIL = 64  # bytes of a stream's chunk kept, in case `"cache_n":` is split across two

DiskFree = Callable[[Path], int]


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def slot_file(slot: int) -> str:
    return f"slot-{slot}.bin"


@functools.lru_cache(maxsize=16384)  # asked for every model at every `/models`
def dir_name(model_id: str) -> str:
    """A model's directory: readable, and unique even where two ids read alike once `/`
    and `:` are replaced."""
    readable = re.sub(r"^\.|[^A-Za-z0-9._-]", "_", model_id)[:80]  # never hidden, never ..
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class CacheKey:
    """What a saved cache belongs to: restored into anything else it is at best useless
    (another n_ctx or slot count) and at worst wrong (another model's KV)."""

    files: tuple[tuple[int, int, int, int], ...]  # (device, inode, size, mtime ns) per part
    n_ctx: int | None
    slots: int
    harness: str
    swa_full: bool

    @classmethod
    def of(cls, parts: Sequence[Path], n_ctx: int | None, slots: int, harness: str,
           swa_full: bool) -> CacheKey:
        stats = [os.stat(p) for p in parts]
        return cls(tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats),
                   n_ctx, slots, harness, swa_full)

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "files": [list(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: Any) -> CacheKey:
        """Raises ValueError for anything `as_json` does not make."""
        try:
            files = tuple((int(a), int(b), int(c), int(d)) for a, b, c, d in data["files"])
            n_ctx = data["n_ctx"]
            if not (n_ctx is None or isinstance(n_ctx, int)):
                raise ValueError(f"n_ctx {n_ctx!r}")
            return cls(files, n_ctx, int(data["slots"]), str(data["harness"]),
                       bool(data["swa_full"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # 1e999 is a float
            raise ValueError(f"not a cache key: {exc}") from None

    def change_from(self, saved: CacheKey) -> str | None:
        """What differs between a `saved` cache and this worker, in words; None: nothing."""
        if saved.files != self.files:
            return "the model file changed"
        for name in ("n_ctx", "slots", "harness", "swa_full"):
            was, now = getattr(saved, name), getattr(self, name)
            if was != now:
                return f"{name} was {was}, is {now}"
        return None


@dataclass(frozen=True)
class CacheFile:
    model: str  # its model's directory name
    path: Path
    size: int
    used: float  # last saved or restored (the file's mtime)


def over_budget(files: Sequence[CacheFile], model_bytes: int, node_bytes: int,
                ) -> list[CacheFile]:
    """The files to remove so that no model holds more than `model_bytes` and all together
    no more than `node_bytes`: least recently used first, the larger of two used at once
    (one save writes all of a model's slots at the same moment) before the smaller."""
    order = sorted(files, key=lambda f: (f.used, -f.size, str(f.path)))
    removed: list[CacheFile] = []
    per_model: collections.Counter[str] = collections.Counter()
    for f in files:
        per_model[f.model] += f.size
    for f in order:
        if per_model[f.model] > model_bytes:
            removed.append(f)
            per_model[f.model] -= f.size
    total = sum(per_model.values())
    for f in order:
        if total <= node_bytes:
            break
        if f not in removed:
            removed.append(f)
            total -= f.size
    return removed


@dataclass
class Manifest:
    key: CacheKey
    slots: dict[int, int]  # slot id -> bytes its file had when saved

    def to_bytes(self, model_id: str) -> bytes:
        return json.dumps({"model_id": model_id, "key": self.key.as_json(),
                           "slots": {str(k): v for k, v in self.slots.items()}}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Raises ValueError for anything `to_bytes` does not make (a file on disk is not
        trusted: a hand-edited or hostile one is discarded, never a failed load)."""
        try:
            raw = json.loads(data)
            slots = {int(k): int(v) for k, v in raw["slots"].items()}
            key = raw["key"]
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
                RecursionError) as exc:
            raise ValueError(f"unreadable manifest: {exc!r}") from None
        return cls(CacheKey.from_json(key), slots)


class PromptCaches:
    """The node's prompt caches: the directory, the budgets, the counts `/metrics` shows.
    Made by the registry with the node's config (read at each use: a reload changes the
    budgets); `disk_free` and `clock` are replaceable for tests."""

    def __init__(self, config: Callable[[], NeuronConfig], *, disk_free: DiskFree = disk_free,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._disk_free = disk_free
        self._clock = clock
        # saves, save_failures, restores, restore_failures, hits, misses, discarded, evicted
        self.counts: collections.Counter[str] = collections.Counter()
        self._held: dict[str, int] = {}  # bytes on disk by model id, once looked at

    @property
    def root(self) -> Path:
        return self._config().state_dir / CACHE_DIR

    def directory(self, model_id: str) -> Path:
        return self.root / dir_name(model_id)

    def wanted(self, spec: ModelSpec, keeps_prompt_cache: bool) -> bool:
        """Whether a worker for `spec` gets a prompt cache: its `prompt_cache` (unset: on),
        where its harness can keep one and the budgets allow any."""
        config = self._config()
        if not keeps_prompt_cache or spec.prompt_cache is False:
            return False
        return config.prompt_cache_bytes > 0 and config.prompt_cache_model_bytes > 0

    def bytes_held(self, model_id: str) -> int:
        """Bytes of its saved cache on disk (for `/models`)."""
        held = self._held.get(model_id)
        if held is None:
            held = self._held[model_id] = sum(f.size for f in self._files_of(
                dir_name(model_id), self.directory(model_id)))
        return held

    def total_bytes(self) -> int:
        return sum(f.size for f in self._all_files())

    def session(self, spec: ModelSpec, parts: Sequence[Path], slots: int, harness: str,
                sliding_window: int | None) -> Session | None:
        """A worker's prompt cache, its directory made; None (with a warning) when it
        cannot have one: the worker then runs without, which is never a failed load."""
        config = self._config()
        directory = self.directory(spec.model_id)
        n_ctx = effective(spec, config.harness_config(harness), "n_ctx")
        swa_full = bool(sliding_window)
        try:
            key = CacheKey.of(parts, n_ctx, slots, harness, swa_full)
            directory.mkdir(parents=True, exist_ok=True)
            # state_dir is not trusted: a planted link would have saves, restores and
            # removals act on the files wherever it points.
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise NotADirectoryError(20, "not a directory (a symlink?)", str(directory))
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable", str(directory))
        except OSError as exc:
            self.counts["save_failures"] += 1
            log.warning("%s: loading without a prompt cache: %s: %s", spec.model_id,
                        exc.filename or directory, exc.strerror or exc)
            return None
        return Session(self, spec.model_id, directory, key)

    # --- what sessions call ----------------------------------------------------------

    def _files_of(self, model: str, directory: Path) -> list[CacheFile]:
        files = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if not _SLOT_FILE.fullmatch(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        files.append(CacheFile(model, Path(entry.path), st.st_size,
                                               st.st_mtime))
        return files

    def _all_files(self) -> list[CacheFile]:
        files: list[CacheFile] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False):
                    files += self._files_of(entry.name, Path(entry.path))
        return files

    def enforce_budgets(self) -> None:
        """Remove least recently used files until every budget holds (blocking: run it in a
        thread)."""
        config = self._config()
        for f in over_budget(self._all_files(), config.prompt_cache_model_bytes,
                             config.prompt_cache_bytes):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f.path)
                self.counts["evicted"] += 1
                log.info("prompt cache: removed %s (%d bytes) to stay within "
                         "prompt_cache_bytes/prompt_cache_model_bytes", f.path, f.size)
        self._held.clear()  # recounted when next asked

    def discard(self, model_id: str, directory: Path, why: str) -> None:
        """Remove a model's saved cache, saying why (never through a link planted where
        its directory was)."""
        removed = 0
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                return
            for entry in os.scandir(directory):
                if _SLOT_FILE.fullmatch(entry.name) or entry.name == MANIFEST:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            self.counts["discarded"] += 1
            log.warning("%s: prompt cache discarded: %s", model_id, why)
        self._held.pop(model_id, None)

    def disk_has_room(self, directory: Path) -> bool:
        try:
            return self._disk_free(directory) >= MIN_FREE_BYTES
        except OSError:
            return False


class Session:
    """One worker's prompt cache: the arguments it runs with, the restore before it is
    ready, the save before it is stopped, and the check of the first answer after a
    restore."""

    def __init__(self, caches: PromptCaches, model_id: str, directory: Path,
                 key: CacheKey) -> None:
        self._caches = caches
        self.model_id = model_id
        self.directory = directory
        self.key = key
        self.restored_tokens = 0
        self.expecting_answer = False  # a restore happened; its first answer not yet seen
        self._restored: set[int] = set()  # the slots restored with tokens in them
        self._tail = b""

    @property
    def args(self) -> tuple[str, ...]:
        extra = ("--slot-save-path", str(self.directory))
        return (*extra, "--swa-full") if self.key.swa_full else extra

    # --- restore ---------------------------------------------------------------------

    async def restore(self, port: int) -> None:
        """Restore every saved slot into the worker at `port`; never raises (a load
        goes on without a cache)."""
        try:
            await asyncio.wait_for(self._restore(port), RESTORE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._caches.counts["restore_failures"] += 1
            log.warning("%s: prompt cache restore gave up after %g s", self.model_id,
                        RESTORE_TIMEOUT_S)
        except (OSError, ValueError, slotapi.SlotApiError) as exc:
            self._caches.counts["restore_failures"] += 1
            log.warning("%s: prompt cache not restored: %s", self.model_id, exc)

    def _manifest(self) -> Manifest | None:
        path = self.directory / MANIFEST
        try:
            data = fsutil.read_regular(path, _MANIFEST_LIMIT)
        except FileNotFoundError:
            return None
        except (OSError, fsutil.NotRegularFile, fsutil.FileTooLarge) as exc:
            self._caches.discard(self.model_id, self.directory, f"{MANIFEST}: {exc}")
            return None
        try:
            manifest = Manifest.from_bytes(data)
        except ValueError as exc:
            self._caches.discard(self.model_id, self.directory, f"{MANIFEST}: {exc}")
            return None
        change = self.key.change_from(manifest.key)
        if change is not None:
            self._caches.discard(self.model_id, self.directory, change)
            return None
        return manifest

    async def _restore(self, port: int) -> None:
        manifest = self._manifest()
        if manifest is None or not manifest.slots:
            return
        restored = tokens = 0
        started = time.monotonic()
        for slot, size in sorted(manifest.slots.items()):
            path = self.directory / slot_file(slot)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed by a budget: the other slots still count
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                self._bad_file(path, f"{st.st_size} bytes where {size} were saved")
                continue
            try:
                n, _ = await slotapi.restore(port, slot, path.name, RESTORE_TIMEOUT_S)
            except slotapi.SlotApiError as exc:
                self._bad_file(path, f"the worker refused it: {exc}")
                continue
            with contextlib.suppress(OSError):
                os.utime(path)  # used: the last the budgets remove
            restored += 1
            tokens += n
            if n:
                self._restored.add(slot)
        if restored:
            self._caches.counts["restores"] += 1
            self.restored_tokens = tokens
            self.expecting_answer = tokens > 0
            log.info("%s: prompt cache restored: %d tokens in %s in %.0f ms",
                     self.model_id, tokens, plural(restored, "slot"),
                     (time.monotonic() - started) * 1000)

    def _bad_file(self, path: Path, why: str) -> None:
        self._caches.counts["restore_failures"] += 1
        self._caches.counts["discarded"] += 1
        log.warning("%s: prompt cache file %s discarded: %s", self.model_id, path.name, why)
        with contextlib.suppress(OSError):
            os.unlink(path)
        self._caches._held.pop(self.model_id, None)

    # --- the first answer after a restore --------------------------------------------

    def observe(self, chunk: bytes) -> None:
        """Part of an answer from this worker (the router passes every chunk while
        `expecting_answer`): its `timings.cache_n` says whether the restore was reused."""
        if not self.expecting_answer:
            return
        data = self._tail + chunk
        found = _CACHE_N.search(data)
        if found is None:
            self._tail = data[-_KEEP_TAIL:]
            return
        self.expecting_answer = False
        self._tail = b""
        cached = int(found.group(1))
        if cached > 0:
            self._caches.counts["hits"] += 1
            log.info("%s: the first answer after a prompt cache restore reused %d cached "
                     "tokens", self.model_id, cached)
        else:
            self._caches.counts["misses"] += 1
            log.warning("%s: the prompt cache restore of %d tokens was not reused: the "
                        "first answer after it reports cache_n 0", self.model_id,
                        self.restored_tokens)

    # --- save ------------------------------------------------------------------------

    async def save(self, port: int) -> None:
        """Save every slot of the worker at `port` (it is still running, taking no more
        requests), within prompt_cache_save_timeout_s; never raises."""
        caches = self._caches
        timeout = caches._config().prompt_cache_save_timeout_s
        saved: dict[int, int] = {}
        short: list[int] = []  # the token counts of slots too short to keep
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._save(port, timeout, saved, short), timeout)
        except asyncio.TimeoutError:
            caches.counts["save_failures"] += 1
            log.warning("%s: prompt cache save gave up after %g s "
                        "(prompt_cache_save_timeout_s); %d slots saved", self.model_id,
                        timeout, len(saved))
        except (OSError, slotapi.SlotApiError) as exc:
            caches.counts["save_failures"] += 1
            log.warning("%s: prompt cache not saved: %s", self.model_id, exc)
        if saved:
            try:
                fsutil.write_atomically(self.directory / MANIFEST,
                                        Manifest(self.key, saved).to_bytes(self.model_id),
                                        durable=False)
            except OSError as exc:
                caches.counts["save_failures"] += 1
                log.warning("%s: prompt cache not saved: %s: %s", self.model_id,
                            exc.filename, exc.strerror)
                return
            caches.counts["saves"] += 1
            log.info("%s: prompt cache saved: %s, %d bytes in %.0f ms", self.model_id,
                     plural(len(saved), "slot"), sum(saved.values()),
                     (time.monotonic() - started) * 1000)
        if short:
            log.info("%s: prompt cache: %s not kept (%s tokens, fewer than %d: cheaper to "
                     "prefill again than to restore)", self.model_id,
                     plural(len(short), "slot"), ", ".join(map(str, short)), MIN_SAVED_TOKENS)
        caches._held.pop(self.model_id, None)
        try:
            caches.enforce_budgets()  # a scan and a few unlinks: short enough for the loop
        except OSError as exc:
            log.warning("prompt cache: cannot keep to the budgets: %s", exc)

    async def _save(self, port: int, timeout: float, saved: dict[int, int],
                    short: list[int]) -> None:
        # The caller's wait_for is the bound; each call's own is only a backstop past it.
        timeout += 1.0
        slots = await slotapi.slots(port, timeout)
        # What was saved before is superseded by what the worker holds now (it restored it
        # and went on): a cache is one moment, never a mix of two.
        for entry in list(os.scandir(self.directory)):
            if _SLOT_FILE.fullmatch(entry.name) or entry.name == MANIFEST:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        if not self._caches.disk_has_room(self.directory):
            raise OSError(28, f"less than {MIN_FREE_BYTES // (1024 * 1024)} MiB free on "
                              f"the file system of {self.directory}")
        for slot in slots:
            # A restored slot that ran no task since says nothing of what it holds.
            known = slot.reported or slot.id not in self._restored
            if known and slot.tokens is not None and slot.tokens < MIN_SAVED_TOKENS:
                # Its answer to GET /slots says enough: no file written to be removed (each
                # cost the worker a save and the disk a file, on every swap).
                if slot.tokens:
                    short.append(slot.tokens)
                continue
            name = slot_file(slot.id)
            tokens, size = await slotapi.save(port, slot.id, name, timeout)
            if tokens < MIN_SAVED_TOKENS:  # empty, or cheaper to prefill than to restore
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                if tokens:
                    short.append(tokens)
                continue
            saved[slot.id] = size
