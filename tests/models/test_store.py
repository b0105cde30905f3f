"""The model store: the caches listed by huggingface_hub's own scan with sizes and the
config's models that use each file, naming a model, and removal that frees space."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.models import store

from ..gpu_fakes import lay_out_hf_cache

REPO = "org/tiny-GGUF"
OTHER_COMMIT = "f" * 40


def config_with(tmp_path: Path, cache: Path, **kw: object) -> NeuronConfig:
    base = NeuronConfig(state_dir=tmp_path / "state", log_dir=tmp_path / "log",
                        harness={"llama-cpp-python": HarnessConfig(hf_cache=cache)})
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, REPO, {
        "tiny-Q8_0.gguf": b"q8" * 1000, "tiny-Q4_K_M.gguf": b"q4" * 500, "README.md": b"hi",
        "BF16/tiny-BF16-00001-of-00002.gguf": b"a" * 300,
        "BF16/tiny-BF16-00002-of-00002.gguf": b"b" * 300,
    })
    return cache


def test_quant_of_file_names() -> None:
    assert store.quant_of("Llama-3-8B-Q4_K_M.gguf") == "Q4_K_M"
    assert store.quant_of("BF16/x-BF16-00001-of-00002.gguf") == "BF16"
    assert store.quant_of("model-iq4_xs.gguf") == "IQ4_XS"
    assert store.quant_of("model.gguf") is None


def test_the_listing_has_every_gguf_with_its_size_and_users(tmp_path: Path,
                                                             cache: Path) -> None:
    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF" + b"\0" * 96)
    config = config_with(
        tmp_path, cache,
        default_models=(ModelSpec("small", repo=REPO, quant="Q4_K_M"),),
        models=(ModelSpec("big", repo=REPO, quant="Q8_0"),
                ModelSpec("also-big", repo=REPO, file="tiny-Q8_0.gguf"),
                ModelSpec("mine", path=local)))
    listing = store.listing(config, loaded=["big"])
    by_file = {m["file"] or m["path"]: m for m in listing["models"]}
    assert set(by_file) == {"tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf",
                            "BF16/tiny-BF16-00001-of-00002.gguf", str(local)}
    q8 = by_file["tiny-Q8_0.gguf"]
    assert (q8["size_bytes"], q8["ids"], q8["loaded"], q8["default"], q8["quant"]) == \
        (2000, ["big", "also-big"], True, False, "Q8_0")
    q4 = by_file["tiny-Q4_K_M.gguf"]
    assert (q4["ids"], q4["loaded"], q4["default"]) == (["small"], False, True)
    split = by_file["BF16/tiny-BF16-00001-of-00002.gguf"]
    assert (split["parts"], split["size_bytes"], split["ids"]) == (2, 600, [])
    assert by_file[str(local)]["source"] == "path" and by_file[str(local)]["ids"] == ["mine"]
    assert by_file[str(local)]["size_bytes"] == 100
    assert listing["total_bytes"] == 2000 + 1000 + 600 + 100
    (cache_entry,) = listing["caches"]
    assert cache_entry["path"] == str(cache) and cache_entry["free_bytes"] > 0


def test_a_missing_cache_lists_nothing(tmp_path: Path) -> None:
    config = config_with(tmp_path, tmp_path / "not-there")
    listing = store.listing(config)
    assert listing["models"] == [] and listing["caches"][0]["exists"] is False


def test_naming_a_model() -> None:
    config = NeuronConfig(models=(ModelSpec("big", repo=REPO, quant="Q8_0"),))
    assert store.spec_of(config, "big").quant == "Q8_0"
    assert store.spec_of(config, "org/x-GGUF:Q4_K_M") == ModelSpec(
        "org/x-GGUF:Q4_K_M", repo="org/x-GGUF", quant="Q4_K_M")
    assert store.spec_of(config, "org/x-GGUF") == ModelSpec("org/x-GGUF", repo="org/x-GGUF")
    with pytest.raises(ValueError, match="neither a model of the config"):
        store.spec_of(config, "nonsense")
    for quant in ("Q4\nK", "Q" * 5000, "Q4\0"):  # echoed in /models/pulls and the journal
        with pytest.raises(ValueError, match="a quant is a name"):
            store.spec_of(config, f"org/x-GGUF:{quant}")


def test_rm_of_one_quant_frees_its_blob_and_keeps_the_others(tmp_path: Path,
                                                            cache: Path) -> None:
    config = config_with(tmp_path, cache)
    found = store.matching(config, f"{REPO}:Q8_0")
    assert [m.file for m in found] == ["tiny-Q8_0.gguf"]
    removal = store.remove(found)
    assert removal.freed_bytes == 2000
    left = {m["file"] for m in store.listing(config)["models"]}
    assert left == {"tiny-Q4_K_M.gguf", "BF16/tiny-BF16-00001-of-00002.gguf"}
    blobs = list((cache / "models--org--tiny-GGUF" / "blobs").iterdir())
    assert len(blobs) == 4  # Q4, two BF16 parts, README


def test_one_cache_named_two_ways_by_two_harnesses_is_one_cache(tmp_path: Path,
                                                              cache: Path) -> None:
    """Both harnesses on the same directory (one through a link): each model is listed,
    matched and removed once, not once per harness."""
    (tmp_path / "link").symlink_to(cache)
    config = dataclasses.replace(config_with(tmp_path, cache), harness={
        "llama-cpp-python": HarnessConfig(hf_cache=cache),
        "llama-server": HarnessConfig(hf_cache=tmp_path / "link" / ".." / "hf")})
    assert store.caches(config) == [cache]
    found = store.matching(config, f"{REPO}:Q8_0")
    assert [m.file for m in found] == ["tiny-Q8_0.gguf"]
    assert [m["file"] for m in store.remove(found).as_json()["removed"]] == ["tiny-Q8_0.gguf"]


def test_rm_never_removes_what_a_planted_snapshot_link_points_at(tmp_path: Path,
                                                                 cache: Path) -> None:
    """A shared cache's snapshot link to a file elsewhere (planted by whoever can write
    the cache): `rm` of that quant removes the link, never its target."""
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"precious")
    link = next((cache / "models--org--tiny-GGUF" / "snapshots").iterdir()) / "tiny-Q8_0.gguf"
    link.unlink()
    link.symlink_to(victim)
    config = config_with(tmp_path, cache)
    store.remove(store.matching(config, f"{REPO}:Q8_0"))
    assert victim.read_bytes() == b"precious" and not link.is_symlink()


def test_rm_of_a_whole_repo_deletes_the_revision_with_huggingface_hub(
        tmp_path: Path, cache: Path) -> None:
    config = config_with(tmp_path, cache)
    removal = store.remove(store.matching(config, REPO))
    assert removal.freed_bytes == 2000 + 1000 + 600 + 2  # the README went with its revision
    assert store.listing(config)["models"] == []
    assert not (cache / "models--org--tiny-GGUF" / "snapshots").exists() or not any(
        (cache / "models--org--tiny-GGUF" / "snapshots").iterdir())


def test_a_blob_another_revision_links_is_kept(tmp_path: Path, cache: Path) -> None:
    lay_out_hf_cache(cache, REPO, {"tiny-Q8_0.gguf": b"q8" * 1000}, commit=OTHER_COMMIT,
                     refs=("v2",))
    config = config_with(tmp_path, cache)
    older = [m for m in store.matching(config, f"{REPO}:Q8_0") if m.revision != OTHER_COMMIT]
    assert store.remove(older).freed_bytes == 0  # the v2 revision still uses the blob
    (kept,) = [m for m in store.listing(config)["models"] if m["quant"] == "Q8_0"]
    assert kept["revision"] == OTHER_COMMIT and Path(kept["path"]).read_bytes() == b"q8" * 1000


def test_rm_refuses_loaded_and_default_models(tmp_path: Path, cache: Path) -> None:
    config = config_with(tmp_path, cache,
                         default_models=(ModelSpec("small", repo=REPO, quant="Q4_K_M"),),
                         models=(ModelSpec("big", repo=REPO, quant="Q8_0"),))
    assert store.blocked_by(config, store.matching(config, "big"), loaded=["big"]) == \
        ["big is loaded"]
    assert store.blocked_by(config, store.matching(config, "big"), loaded=[]) == []
    assert store.blocked_by(config, store.matching(config, "small"), loaded=[]) == \
        ["small is a default model"]
    with pytest.raises(ValueError, match="local path"):
        store.matching(dataclasses.replace(config, models=(
            ModelSpec("mine", path=tmp_path / "x.gguf"),)), "mine")


def test_a_commit_two_repos_share_never_takes_the_other_repos_files(tmp_path: Path,
                                                                    cache: Path) -> None:
    """huggingface_hub deletes revisions by commit alone; a duplicated repo shares them."""
    lay_out_hf_cache(cache, "org/copy-GGUF", {"copy-Q8_0.gguf": b"c" * 700})  # same commit
    config = config_with(tmp_path, cache)
    assert store.remove(store.matching(config, "org/copy-GGUF")).freed_bytes == 700
    left = {(m["repo"], m["file"]) for m in store.listing(config)["models"]}
    assert (REPO, "tiny-Q8_0.gguf") in left and len(left) == 3
