"""The model store: what the Hugging Face caches and the config's local paths hold, which
models use each file, and removing cached models.

Listing and removal go through huggingface_hub's own cache functions (`scan_cache_dir`,
`HFCacheInfo.delete_revisions`), never a walk of our own over its layout, so a cache
huggingface_hub writes is a cache this module reads. Which model of the config a file
serves is `hub.select`'s answer, the same the loads give. Nothing here blocks for long
but a scan of a large cache; the daemon runs it in a thread.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_HARNESS, ModelSpec, NeuronConfig
from .hub import SPLIT_NAME, ResolveError, default_cache, select

# The quantization as GGUF file names say it: Q4_K_M, IQ4_XS, Q8_0, BF16, F16, ...
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4)(?![A-Za-z0-9])",
                    re.IGNORECASE)


def quant_of(name: str) -> str | None:
    """The quant a GGUF file name carries (the last one: `Llama-3-8B-Q4_K_M.gguf`)."""
    stem = SPLIT_NAME.sub(lambda m: m["stem"], name.rsplit("/", 1)[-1])
    found = _QUANT.findall(stem.removesuffix(".gguf"))
    return found[-1].upper() if found else None


@dataclass
class StoredModel:
    """One model on disk: a GGUF in a cache (every part of a split one), or a `path`."""

    source: str  # "hub" or "path"
    path: Path  # what a worker loads: the file, or part 1
    size_bytes: int
    last_used: float | None  # newest access time of its blobs (or file)
    repo: str | None = None
    revision: str | None = None  # the commit
    refs: tuple[str, ...] = ()
    file: str | None = None  # in the repo
    parts: tuple[str, ...] = ()
    cache: Path | None = None
    ids: list[str] = field(default_factory=list)  # the config's models that use it
    # Every GGUF of its revision: `select` must see the others to call a spec ambiguous,
    # as a load would.
    siblings: tuple[str, ...] = ()

    @property
    def quant(self) -> str | None:
        return quant_of(self.file or self.path.name)

    def as_json(self, loaded: Collection[str] = (), defaults: Collection[str] = ()
                ) -> dict[str, Any]:
        return {
            "source": self.source, "repo": self.repo, "revision": self.revision,
            "refs": list(self.refs), "file": self.file, "quant": self.quant,
            "path": str(self.path), "parts": len(self.parts) or 1,
            "size_bytes": self.size_bytes, "last_used": self.last_used, "ids": self.ids,
            "loaded": any(i in loaded for i in self.ids),
            "default": any(i in defaults for i in self.ids),
            "cache": str(self.cache) if self.cache else None,
        }


def caches(config: NeuronConfig) -> list[Path]:
    """Every Hugging Face cache the config's harnesses use (the default one when a harness
    names none), each once."""
    found: list[Path] = []
    seen: set[Path] = set()
    for name in sorted({DEFAULT_HARNESS, *config.harness,
                        *(s.harness for s in config.catalogue().values())}):
        cache = config.harness_config(name).hf_cache or default_cache()
        # One directory named two ways (a link, `..`, a trailing part) is one cache: its
        # models are listed, and removed, once.
        real = cache.resolve()
        if real not in seen:
            seen.add(real)
            found.append(cache)
    return found


def cache_for(config: NeuronConfig, spec: ModelSpec) -> Path:
    return config.harness_config(spec.harness).hf_cache or default_cache()


def scan(cache: Path) -> list[StoredModel]:
    """The GGUF models in one cache, by huggingface_hub's scan: one entry per model per
    revision (a split model's parts together)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    stored = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            files = {f.file_path.relative_to(rev.snapshot_path).as_posix(): f
                     for f in rev.files}
            for first, parts in _gguf_groups(files).items():
                infos = [files[p] for p in parts]
                blobs = {i.blob_path: i for i in infos}  # a blob shared by two names counts once
                stored.append(StoredModel(
                    "hub", infos[0].file_path, sum(i.size_on_disk for i in blobs.values()),
                    max(i.blob_last_accessed for i in infos), repo=repo.repo_id,
                    revision=rev.commit_hash, refs=tuple(sorted(rev.refs)), file=first,
                    parts=tuple(parts), cache=cache,
                    siblings=tuple(n for n in files if n.lower().endswith(".gguf"))))
    return stored


def _gguf_groups(names: Iterable[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        if not name.lower().endswith(".gguf"):
            continue
        match = SPLIT_NAME.match(name)
        key = f"{match['stem']}-00001-of-{match['count']}.gguf" if match else name
        groups.setdefault(key, []).append(name)
    return groups


def local_paths(config: NeuronConfig) -> list[StoredModel]:
    """The config's models with a `path`, one entry per file (ids sharing it together)."""
    by_path: dict[Path, StoredModel] = {}
    for spec in config.catalogue().values():
        if spec.path is None:
            continue
        entry = by_path.get(spec.path)
        if entry is None:
            size, used = 0, None
            with contextlib.suppress(OSError):
                st = spec.path.stat()
                size, used = st.st_size, st.st_atime
            entry = by_path[spec.path] = StoredModel("path", spec.path, size, used)
        entry.ids.append(spec.model_id)
    return list(by_path.values())


def uses(spec: ModelSpec, model: StoredModel) -> bool:
    """Whether a load of `spec` would use `model`: the file `hub.select` picks for it in that
    revision, which must be the one `spec.revision` (default main) points at."""
    if model.source != "hub" or spec.path is not None:
        return False
    if (spec.repo or spec.model_id) != model.repo:
        return False
    revision = spec.revision or "main"
    if revision not in model.refs and revision != model.revision:
        return False
    try:
        return select(_names_of(model), spec, model.repo or "")[0] == model.parts[0]
    except ResolveError:
        return False


def _names_of(model: StoredModel) -> list[str]:
    return list(model.siblings)


def inventory(config: NeuronConfig) -> list[StoredModel]:
    """Every GGUF in the config's caches and every local `path` it names, each with the ids
    of the config's models that use it."""
    stored = [m for cache in caches(config) for m in scan(cache)]
    for model in stored:
        model.ids = [spec.model_id for spec in config.catalogue().values()
                     if cache_for(config, spec) == model.cache and uses(spec, model)]
    return stored + local_paths(config)


def listing(config: NeuronConfig, loaded: Collection[str] = ()) -> dict[str, Any]:
    """What `neuronctl models --json` prints: the models, their total and each cache's free
    space."""
    from .hub import free_bytes

    models = inventory(config)
    defaults = [s.model_id for s in config.default_models]
    return {
        "models": [m.as_json(loaded, defaults) for m in models],
        "total_bytes": sum(m.size_bytes for m in models),
        "caches": [{"path": str(c), "exists": c.is_dir(), "free_bytes": free_bytes(c)}
                   for c in caches(config)],
    }


# --- naming a model -------------------------------------------------------------------------


_QUANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def spec_of(config: NeuronConfig, name: str) -> ModelSpec:
    """`ID|REPO[:QUANT]`: a catalogue id is its entry; otherwise a Hugging Face repo, with a
    quant after a colon (repo ids hold no colon)."""
    entry = config.catalogue().get(name)
    if entry is not None:
        return entry
    repo, _, quant = name.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r} is neither a model of the config nor a Hugging Face repo "
                         "(ORG/NAME[:QUANT])")
    if quant and not _QUANT_NAME.fullmatch(quant):
        raise ValueError(f"{name[:100]!r}: a quant is a name such as Q4_K_M (letters, "
                         "digits, _ . -; at most 32)")
    # Named as asked: two quants of one repo are two pulls, not one.
    return ModelSpec(name, repo=repo, quant=quant or None)


def matching(config: NeuronConfig, name: str) -> list[StoredModel]:
    """The cached models `rm NAME` means: a catalogue id's file, or a repo's GGUFs (with
    a quant, those of that quant), in every revision."""
    spec = spec_of(config, name)
    if spec.path is not None:
        raise ValueError(f"{name} is a local path ({spec.path}); neuronctl removes only what "
                         "it downloaded")
    repo = spec.repo or spec.model_id
    found = []
    for model in inventory(config):
        if model.source != "hub" or model.repo != repo:
            continue
        if spec.file is not None or name in config.catalogue():
            if _same_file(spec, model):
                found.append(model)
        elif spec.quant is None or (model.quant or "").upper() == spec.quant.upper():
            found.append(model)
    return found


def _same_file(spec: ModelSpec, model: StoredModel) -> bool:
    if spec.file is not None:
        return spec.file in model.parts
    try:
        return select(_names_of(model), spec, model.repo or "")[0] == model.parts[0]
    except ResolveError:
        return False


# --- removing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    removed: list[StoredModel]
    freed_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {"removed": [m.as_json() for m in self.removed], "freed_bytes": self.freed_bytes}


def remove(models: list[StoredModel]) -> Removal:
    """Delete `models` from their caches. A revision whose every GGUF goes is deleted whole
    by huggingface_hub's `delete_revisions` (blobs no other revision shares, the snapshot,
    its refs); one quant of a revision that keeps others loses only that file's link and,
    unless another revision links it too, its blob (the paths from the same scan)."""
    from huggingface_hub import scan_cache_dir

    freed = 0
    by_cache: dict[Path, list[StoredModel]] = {}
    for model in models:
        assert model.cache is not None
        by_cache.setdefault(model.cache, []).append(model)
    for cache, chosen in by_cache.items():
        info = scan_cache_dir(cache)
        whole: list[str] = []
        # delete_revisions names revisions by commit alone: a commit two repos share (a
        # duplicated repo) would take the other repo's files too, so those go file by file.
        commits = collections.Counter(r.commit_hash for repo in info.repos
                                      for r in repo.revisions)
        for repo in info.repos:
            for rev in repo.revisions:
                mine = [m for m in chosen if m.repo == repo.repo_id
                        and m.revision == rev.commit_hash]
                if not mine:
                    continue
                ggufs = {f.file_path for f in rev.files if f.file_name.lower().endswith(".gguf")}
                going = {rev.snapshot_path / p for m in mine for p in m.parts}
                if ggufs <= going and commits[rev.commit_hash] == 1:
                    whole.append(rev.commit_hash)
                    continue
                shared = {f.blob_path for r in repo.revisions if r is not rev for f in r.files}
                # The scan resolves each snapshot link, wherever it points: only a blob of
                # this repo is removed, never what a planted link names (a shared cache).
                blobs = (repo.repo_path / "blobs").resolve()
                for info_file in rev.files:
                    if info_file.file_path in going:
                        info_file.file_path.unlink()
                        if info_file.blob_path not in shared \
                                and info_file.blob_path.parent == blobs \
                                and info_file.blob_path.exists():
                            freed += info_file.size_on_disk
                            info_file.blob_path.unlink()
        if whole:
            strategy = info.delete_revisions(*whole)
            freed += strategy.expected_freed_size
            strategy.execute()
    return Removal(models, freed)


def blocked_by(config: NeuronConfig, models: list[StoredModel], loaded: Collection[str]
               ) -> list[str]:
    """Why `rm` refuses without --force: the ids among `models`' users that are loaded or
    default models."""
    defaults = {s.model_id for s in config.default_models}
    reasons = []
    for model in models:
        for model_id in model.ids:
            if model_id in loaded:
                reasons.append(f"{model_id} is loaded")
            elif model_id in defaults:
                reasons.append(f"{model_id} is a default model")
    return sorted(set(reasons))
