"""The Hugging Face Hub: which GGUF of a repo a spec means, the cache, the download.

A model without a `path` names a repo (and a quant or a file); `Fetcher.resolve` finds
its GGUF in the harness's cache or downloads it, so that every worker is given a local
file. A local `path` is files.py's. Everything here blocks on the disk or the network;
files.download runs `Fetcher.resolve` in a thread of its own (`aio.in_thread`) so the
event loop, the API and the systemd heartbeat keep going.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelSpec
from ..errors import DownloadError, ModelFileError, NotEnoughDisk, clip
from ..units import fmt_bytes

# `Model-Q4_K_M-00001-of-00003.gguf`: llama.cpp's split files; the worker is given part 1.
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_LISTED = 12  # repo files named in an error, at most
_LOG_EVERY_S = 2.0


class ResolveError(ModelFileError):
    """No file to load: missing, not in the repo, or ambiguous (a fetch that fails is a
    DownloadError)."""


class DownloadCancelled(Exception):
    """Raised inside the download thread once the load it serves was cancelled."""


@dataclass(frozen=True)
class Resolved:
    path: Path  # what the worker loads: the file, or part 1 of a split model
    parts: tuple[Path, ...]  # every file of the model, for the VRAM estimate
    source: str  # for logs: the path, or repo@revision:file


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hf_offline(environ: Mapping[str, str] | None = None) -> bool:
    """`HF_HUB_OFFLINE=1`, read now: huggingface_hub reads it once, at import."""
    env = os.environ if environ is None else environ
    return _truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE"))


def from_hub(spec: ModelSpec) -> bool:
    """Whether the spec's GGUF comes from a Hugging Face repo (found in the cache or
    downloaded) rather than from its own `path`."""
    return spec.path is None


# --- choosing the file in a repo -------------------------------------------------------------


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # `Q4_K` must not pick `Q4_K_M`, nor `Q4_XS` pick `IQ4_XS`: the quant stands alone.
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)


def _groups(names: Iterable[str]) -> dict[str, list[str]]:
    """GGUF files as models: a split model's parts are one entry, keyed by its part 1."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        if not name.lower().endswith(".gguf"):
            continue
        match = SPLIT_NAME.match(name)
        if match:
            first = f"{match['stem']}-00001-of-{match['count']}.gguf"
            groups.setdefault(first, []).append(name)
        else:
            groups[name] = [name]
    return groups


def _is_projector(name: str) -> bool:
    # Vision projectors sit beside the model in many repos and share its quant names.
    return name.rsplit("/", 1)[-1].lower().startswith("mmproj")


def _listing(names: Iterable[str]) -> str:
    groups = sorted(_groups(names))
    shown = ", ".join(groups[:_LISTED])
    more = f" and {len(groups) - _LISTED} more" if len(groups) > _LISTED else ""
    return f"{shown}{more}" if groups else "no .gguf files"


def select(names: Iterable[str], spec: ModelSpec, where: str) -> list[str]:
    """The repo files that make up the model `spec` asks for: one file, or every part of a
    split one (part 1 first). `where` names the repo in errors."""
    names = list(names)
    groups = _groups(names)
    if spec.file is not None:
        match = SPLIT_NAME.match(spec.file)
        key = f"{match['stem']}-00001-of-{match['count']}.gguf" if match else spec.file
        if spec.file not in names or key not in groups:
            raise ResolveError(f"{where} has no file {clip(spec.file)}; it has: {_listing(names)}")
        chosen = key
    else:
        candidates = [k for k in groups if not _is_projector(k)]
        qualifier = ""
        if spec.quant is not None:
            pattern = _quant_pattern(spec.quant)
            candidates = [k for k in candidates if pattern.search(k)]
            qualifier = f" with quant {spec.quant}"
        if not candidates:
            raise ResolveError(f"{where} has no GGUF file{qualifier}; it has: {_listing(names)}")
        if len(candidates) > 1:
            raise ResolveError(
                f"{where} has several GGUF files{qualifier}: "
                f"{', '.join(candidates[:_LISTED])}; set `file` to choose one"
            )
        chosen = candidates[0]
    parts = groups[chosen]
    match = SPLIT_NAME.match(chosen)
    if match and len(parts) != int(match["count"]):
        raise ResolveError(
            f"{where}: split model {chosen} has {len(parts)} of its {int(match['count'])} parts"
        )
    return parts


# --- the Hugging Face cache ------------------------------------------------------------------


def default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_dir(cache: Path, repo_id: str) -> Path:
    """`models--ORG--NAME`: huggingface_hub's own layout (blobs/, refs/, snapshots/)."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder `revision` (a branch, tag or commit; default main) points to."""
    repo = repo_cache_dir(cache, repo_id)
    revision = revision or "main"
    commit = revision
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="ascii", errors="replace").strip()
    elif not _COMMIT.match(revision):
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def cached_files(snapshot: Path) -> list[str]:
    """Files of a cached snapshot whose content is really there (not dangling links)."""
    names = []
    for path in snapshot.rglob("*"):
        if path.is_file():  # follows the link into blobs/
            names.append(path.relative_to(snapshot).as_posix())
    return sorted(names)


# --- fetching ---------------------------------------------------------------------------------


class Progress:
    """How far a fetch is; written by the download thread, read by the event loop.

    Bytes come from huggingface_hub's progress bars (`tqdm_class`) where it accepts one, and
    from the size of the growing `.incomplete` blob otherwise; whichever is further ahead.
    """

    def __init__(self, log: Callable[[str], None] = lambda line: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total_bytes: int | None = None
        self.file: str | None = None
        self.file_total_bytes: int | None = None  # the current part's size, when listed
        self._log = log
        self._clock = clock
        self._finished_bytes = 0  # parts already complete
        self._bar_bytes = 0  # the current part, by its progress bars
        self._blob_dir: Path | None = None
        self._part_started = 0.0
        self._logged_at = -_LOG_EVERY_S
        self._cancelled = threading.Event()

    @property
    def done_bytes(self) -> int:
        done = self._finished_bytes + max(self._bar_bytes, self._incomplete_bytes())
        return min(done, self.total_bytes) if self.total_bytes else done

    @property
    def file_done_bytes(self) -> int:
        """The current part's bytes so far (a resumed part counts what it resumed from)."""
        return max(self._bar_bytes, self._incomplete_bytes())

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "done_bytes": self.done_bytes, "total_bytes": self.total_bytes}

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def log(self, line: str) -> None:
        self._log(line)

    def start_part(self, name: str, blob_dir: Path, size: int | None = None) -> None:
        self.file, self._blob_dir, self.file_total_bytes = name, blob_dir, size
        self._bar_bytes = 0
        self._part_started = time.time()
        self._logged_at = -_LOG_EVERY_S
        self.log(f"download: fetching {name}")

    def finish_part(self, size: int) -> None:
        self._bar_bytes, self._blob_dir = 0, None
        self._finished_bytes += size

    def advance(self, bar_bytes: int) -> None:
        """A progress bar of the current part got to `bar_bytes`."""
        if self._cancelled.is_set():
            raise DownloadCancelled
        self._bar_bytes = max(self._bar_bytes, bar_bytes)
        now = self._clock()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            self.log(f"download: {self.file}: {self.describe()}")

    def describe(self) -> str:
        done = self.done_bytes
        if not self.total_bytes:
            return _size(done)
        return f"{_size(done)} of {_size(self.total_bytes)} ({100 * done // self.total_bytes}%)"

    def _incomplete_bytes(self) -> int:
        blob_dir = self._blob_dir
        if blob_dir is None:
            return 0
        best = 0
        with contextlib.suppress(OSError):
            for path in blob_dir.glob("*.incomplete"):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    if st.st_mtime >= self._part_started - 1:
                        best = max(best, st.st_size)
        return best


# --- disk space -----------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the filesystem that holds `path`, or would: its
    nearest existing folder, since a cache not made yet lands in its parent."""
    for where in (path, *path.parents):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            return shutil.disk_usage(where).free
    return shutil.disk_usage("/").free


def partial_bytes(cache: Path, repo_id: str) -> int:
    """What interrupted downloads of `repo_id` left (`blobs/*.incomplete`): a resumed
    download needs only the rest."""
    total = 0
    with contextlib.suppress(OSError):
        for path in (repo_cache_dir(cache, repo_id) / "blobs").glob("*.incomplete"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


def _out_of_space(exc: BaseException | None) -> bool:
    """Whether ENOSPC (or EDQUOT) is anywhere in what `exc` was raised from."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _remove_partials(blob_dir: Path, since: float) -> tuple[int, int]:
    """Remove the `.incomplete` blobs written since `since`: a full disk must not be left
    full by a download that will not finish. Returns (files, bytes) removed."""
    files = removed = 0
    with contextlib.suppress(OSError):
        for path in blob_dir.glob("*.incomplete"):
            with contextlib.suppress(OSError):
                st = path.stat()
                if st.st_mtime >= since - 1:
                    path.unlink()
                    files, removed = files + 1, removed + st.st_size
    return files, removed


def _size(n: int) -> str:
    return fmt_bytes(n)  # the package's one byte formatter: the CLI says the same size


def _bar_class(progress: Progress) -> type:
    """A tqdm class for huggingface_hub that reports to `progress` and prints nothing."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own bars take a name; tqdm does not
            kwargs["disable"] = True  # the model's log gets our lines instead
            super().__init__(*args, **kwargs)
            self._count = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._count += int(n or 0)
            progress.advance(self._count)
            return super().update(n)

    return Bar


def _accepts_tqdm_class(fn: Callable[..., Any]) -> bool:
    import inspect  # not at import time: `neuronctl start` spawns its first worker sooner

    try:
        return "tqdm_class" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resumable_download(repo_id: str, filename: str, *, revision: str | None, cache_dir: str,
                       tqdm_class: Any = None, endpoint: str | None = None) -> str:
    """hf_hub_download, resumable across processes. huggingface_hub writes each download to
    a file unique to its process and deletes it when the download fails, so an interrupted
    pull would start over; here the blob is fetched first into `blobs/<etag>.incomplete`,
    a name that outlives the process, continued with a Range request (huggingface_hub's own
    `http_get`), and then hf_hub_download finds the blob in place and only writes the
    snapshot link and the ref, its own cache layout."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, endpoint=endpoint)
    if meta.etag and meta.commit_hash:
        from filelock import FileLock

        blob = repo_cache_dir(Path(cache_dir), repo_id) / "blobs" / meta.etag
        # One writer per partial file, across processes (a load in the daemon and a pull
        # beside it): in the cache's `.locks`, which scan_cache_dir skips, under a name of
        # our own so that hf_hub_download's lock, taken below, is never held here.
        locks = Path(cache_dir) / ".locks" / repo_cache_dir(Path(), repo_id).name
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{meta.etag}.neuronctl.lock")):
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                partial = blob.with_name(blob.name + ".incomplete")
                with open(partial, "ab") as fh:
                    http_get(meta.location, fh, resume_size=fh.tell(),
                             expected_size=meta.size, displayed_filename=filename,
                             tqdm_class=tqdm_class)
                partial.replace(blob)
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           endpoint=endpoint)


@dataclass(frozen=True)
class _RemoteFile:
    name: str
    size: int | None


class Fetcher:
    """Resolves a Hugging Face model to local files, downloading what the cache lacks.

    `api` lists a repo (huggingface_hub's HfApi), `download` fetches one file
    (hf_hub_download) and `free_space` says how many bytes the cache's filesystem has
    left (`free_bytes`); tests replace them.
    """

    def __init__(self, cache: Path | None, *, offline: bool | None = None,
                 api: Any = None, download: Callable[..., str] | None = None,
                 free_space: Callable[[Path], int] = free_bytes,
                 endpoint: str | None = None) -> None:
        self.cache = cache or default_cache()
        self.endpoint = endpoint  # the Hub's URL: HF_ENDPOINT's, unless given
        self.offline = hf_offline() if offline is None else offline
        # Why nothing is downloaded, for messages: the environment's say, or the caller's
        # (a `show` reads the cache only, whatever the environment allows).
        self._by_env = offline is None
        self._offline_why = "HF_HUB_OFFLINE=1" if self._by_env else "reading the cache only"
        self._api = api
        self._download = download
        self._free_space = free_space

    def resolve(self, spec: ModelSpec, progress: Progress) -> Resolved:
        repo_id = spec.repo or spec.model_id  # an alias id names its repo in `repo`
        where = f"Hugging Face repo {repo_id}" + (f"@{spec.revision}" if spec.revision else "")
        # The cache first: a model fetched once loads with no network at all.
        snapshot = cached_snapshot(self.cache, repo_id, spec.revision)
        cache_error: ResolveError | None = None
        if snapshot is not None:
            try:
                parts = select(cached_files(snapshot), spec, f"{where} (cached)")
            except ResolveError as exc:
                cache_error = exc
            else:
                paths = tuple(snapshot / p for p in parts)
                progress.log(f"download: {parts[0]} is in the cache {snapshot}")
                return Resolved(paths[0], paths, f"{repo_id}:{parts[0]}")
        if self.offline:
            if cache_error is not None:
                raise ResolveError(f"{cache_error.message} ({self._offline_why}: only the "
                                   f"cache {self.cache} was searched)")
            raise ResolveError(f"{where} is not in the cache {self.cache}" + (
                " and HF_HUB_OFFLINE=1 forbids downloading it" if self._by_env else ""))
        remote = self._list_remote(repo_id, spec.revision, where)
        parts = select([f.name for f in remote], spec, where)
        sizes = {f.name: f.size for f in remote}
        known = [sizes.get(p) for p in parts]
        progress.total_bytes = sum(s for s in known if s) if all(known) else None
        if progress.total_bytes is not None:
            self._check_space(repo_id, parts[0], progress.total_bytes)
        paths = tuple(self._fetch(repo_id, spec.revision, p, sizes.get(p), progress)
                      for p in parts)
        progress.log(f"download: done, {progress.describe()}")
        return Resolved(paths[0], paths, f"{repo_id}:{parts[0]}")

    def _list_remote(self, repo_id: str, revision: str | None, where: str) -> list[_RemoteFile]:
        from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

        api = self._api
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=self.endpoint)
        try:
            entries = list(api.list_repo_tree(repo_id, revision=revision, recursive=True))
        except RevisionNotFoundError:
            raise ResolveError(f"{where}: no such revision {revision}") from None
        except RepositoryNotFoundError:
            raise ResolveError(
                f"{where} not found (or private or gated: give the service an HF_TOKEN)"
            ) from None
        except Exception as exc:  # network, proxy, TLS: say what it was
            raise DownloadError(f"cannot list {where}: {_describe(exc)}") from None
        return [_RemoteFile(e.path, getattr(e, "size", None))
                for e in entries if hasattr(e, "size")]  # files; folders have no size

    def _check_space(self, repo_id: str, name: str, total: int) -> None:
        """Refuse a download the cache's filesystem cannot hold, before its first byte."""
        needed = max(0, total - partial_bytes(self.cache, repo_id))
        free = self._free_space(self.cache)
        if needed > free:
            raise NotEnoughDisk(
                f"not enough disk space for {repo_id}:{name}: it needs {_size(needed)}, "
                f"the Hugging Face cache {self.cache} has {_size(free)} free")

    def _fetch(self, repo_id: str, revision: str | None, name: str, size: int | None,
               progress: Progress) -> Path:
        download = self._download
        kwargs: dict[str, Any] = {"revision": revision, "cache_dir": str(self.cache)}
        if download is None:
            download = resumable_download
            kwargs["endpoint"] = self.endpoint
        if _accepts_tqdm_class(download):
            kwargs["tqdm_class"] = _bar_class(progress)
        blob_dir = repo_cache_dir(self.cache, repo_id) / "blobs"
        progress.start_part(name, blob_dir, size)
        started = time.time()
        try:
            path = Path(download(repo_id, name, **kwargs))
        except DownloadCancelled:
            raise  # its partial file stays: the next pull resumes from it
        except Exception as exc:
            if progress.cancelled:
                raise DownloadCancelled from None
            if _out_of_space(exc):
                files, removed = _remove_partials(blob_dir, started)
                progress.log(f"download: out of disk space; removed {files} partial "
                             f"file(s), {_size(removed)}")
                raise NotEnoughDisk(
                    f"the disk of the Hugging Face cache {self.cache} filled up while "
                    f"downloading {name} from {repo_id}; removed its partial files "
                    f"({_size(removed)}), {_size(self._free_space(self.cache))} free "
                    "now") from None
            raise DownloadError(
                f"cannot download {name} from {repo_id}: {_describe(exc)}") from None
        progress.finish_part(size if size is not None else path.stat().st_size)
        return path


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
