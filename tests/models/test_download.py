"""Downloads through the real huggingface_hub client, from a local Hub over HTTP
(tests/fake_hub_server.py): resumed after an interruption, refused when the disk is too
small, and their partial files removed when the disk fills midway."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuronctl.config import ModelSpec
from neuronctl.errors import NotEnoughDisk
from neuronctl.models.hub import Fetcher, Progress, partial_bytes, repo_cache_dir

from ..fake_hub_server import COMMIT, FakeHubServer
from ..gpu_fakes import FakeHub

REPO = "org/big-GGUF"
CONTENT = os.urandom(3 << 20)


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: another test file may have
    imported it offline in this process."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub() -> Iterator[FakeHubServer]:
    with FakeHubServer({REPO: {"big-Q4_K_M.gguf": CONTENT, "big-Q8_0.gguf": b"x" * 10}}) as hub:
        yield hub


def blob_of(cache: Path, content: bytes) -> Path:
    return repo_cache_dir(cache, REPO) / "blobs" / hashlib.sha256(content).hexdigest()


def test_a_download_lands_in_huggingface_hubs_own_layout(tmp_path: Path,
                                                         hub: FakeHubServer) -> None:
    cache = tmp_path / "hf"
    progress = Progress()
    resolved = Fetcher(cache, offline=False, endpoint=hub.url).resolve(
        ModelSpec(REPO, quant="Q4_K_M"), progress)
    assert resolved.path == repo_cache_dir(cache, REPO) / "snapshots" / COMMIT / \
        "big-Q4_K_M.gguf"
    assert resolved.path.read_bytes() == CONTENT and resolved.path.is_symlink()
    assert progress.done_bytes == progress.total_bytes == len(CONTENT)
    assert (repo_cache_dir(cache, REPO) / "refs" / "main").read_text() == COMMIT
    # The cache answers the next time: no second GET.
    Fetcher(cache, offline=False, endpoint=hub.url).resolve(ModelSpec(REPO, quant="Q4_K_M"),
                                                            Progress())
    assert hub.gets("big-Q4_K_M.gguf") == [None]


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path,
                                                          hub: FakeHubServer) -> None:
    cache = tmp_path / "hf"
    # What a pull killed midway leaves: the blob's first bytes under its lasting name.
    partial = blob_of(cache, CONTENT).with_name(blob_of(cache, CONTENT).name + ".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(CONTENT[:1_000_000])
    assert partial_bytes(cache, REPO) == 1_000_000
    progress = Progress()
    resolved = Fetcher(cache, offline=False, endpoint=hub.url).resolve(
        ModelSpec(REPO, quant="Q4_K_M"), progress)
    assert hub.gets("big-Q4_K_M.gguf") == ["bytes=1000000-"]
    assert resolved.path.read_bytes() == CONTENT
    assert not partial.exists()


def test_not_enough_space_is_refused_before_the_first_byte_with_both_numbers(
        tmp_path: Path, hub: FakeHubServer) -> None:
    cache = tmp_path / "hf"
    fetcher = Fetcher(cache, offline=False, endpoint=hub.url, free_space=lambda p: 1 << 20)
    with pytest.raises(NotEnoughDisk) as refused:
        fetcher.resolve(ModelSpec(REPO, quant="Q4_K_M"), Progress())
    assert refused.value.status == 507
    assert refused.value.message == (
        f"not enough disk space for {REPO}:big-Q4_K_M.gguf: it needs 3 MiB, the Hugging "
        f"Face cache {cache} has 1 MiB free")
    assert hub.gets("big-Q4_K_M.gguf") == []


def test_the_space_check_counts_what_a_partial_download_holds(
        tmp_path: Path, hub: FakeHubServer) -> None:
    cache = tmp_path / "hf"
    blobs = repo_cache_dir(cache, REPO) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (hashlib.sha256(CONTENT).hexdigest() + ".incomplete")).write_bytes(
        CONTENT[:(2 << 20)])
    fetcher = Fetcher(cache, offline=False, endpoint=hub.url, free_space=lambda p: 1 << 20)
    resolved = fetcher.resolve(ModelSpec(REPO, quant="Q4_K_M"), Progress())
    assert resolved.path.read_bytes() == CONTENT  # 1 MiB was left to fetch, 1 MiB was free


class FullDiskHub(FakeHub):
    """hf_hub_download's stand-in whose disk fills halfway: the write raises ENOSPC, as
    write(2) does, after half the file is on disk."""

    def download(self, repo_id: str, filename: str, *, revision: str | None,
                 cache_dir: str, tqdm_class: object = None) -> str:
        content = self.files[filename]
        blobs = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        partial = blobs / (hashlib.sha256(content).hexdigest() + ".incomplete")
        partial.write_bytes(content[:len(content) // 2])
        raise OSError(28, "No space left on device")


def test_a_disk_that_fills_midway_loses_the_partial_files(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    hub = FullDiskHub(cache, {"m-Q4_K_M.gguf": b"w" * 4000})
    lines: list[str] = []
    fetcher = Fetcher(cache, offline=False, api=hub, download=hub.download,
                      free_space=lambda p: 1 << 30)
    with pytest.raises(NotEnoughDisk, match=r"filled up while downloading m-Q4_K_M.gguf "
                                            r"from org/m-GGUF; removed its partial files "
                                            r"\(2 KiB\), 1.0 GiB free now"):
        fetcher.resolve(ModelSpec("org/m-GGUF", quant="Q4_K_M"), Progress(log=lines.append))
    assert list((repo_cache_dir(cache, "org/m-GGUF") / "blobs").iterdir()) == []
    assert "download: out of disk space; removed 1 partial file(s), 2 KiB" in lines


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_real_full_disk_midway_removes_the_partial_and_says_so(
        tmp_path: Path, hub: FakeHubServer) -> None:
    """A 1 MiB tmpfs and a 3 MiB file, past a free-space probe that says there is room (as a
    thin-provisioned or shared disk may): write(2) fails with ENOSPC for real."""
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        cache = disk / "hf"
        fetcher = Fetcher(cache, offline=False, endpoint=hub.url, free_space=lambda p: 1 << 40)
        with pytest.raises(NotEnoughDisk, match=r"filled up while downloading big-Q4_K_M\.gguf"):
            fetcher.resolve(ModelSpec(REPO, quant="Q4_K_M"), Progress())
        assert list(disk.rglob("*.incomplete")) == []
        assert os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize > 900_000


def test_two_downloads_of_one_file_at_once_fetch_it_once(tmp_path: Path,
                                                         hub: FakeHubServer) -> None:
    """A load in the daemon and a pull beside it: one writes the partial file, the other
    waits for it and finds the blob in place."""
    cache = tmp_path / "hf"
    hub.hold_at = 1 << 20
    results: list[Path] = []

    def fetch() -> None:
        fetcher = Fetcher(cache, offline=False, endpoint=hub.url)
        results.append(fetcher.resolve(ModelSpec(REPO, quant="Q4_K_M"), Progress()).path)

    first = threading.Thread(target=fetch)
    first.start()
    assert hub.holding.wait(30)
    second = threading.Thread(target=fetch)
    second.start()
    hub.release.set()
    first.join(60)
    second.join(60)
    assert len(results) == 2 and all(p.read_bytes() == CONTENT for p in results)
    # The first GET, cut at 1 MiB, and huggingface_hub's own retry of it (from the start:
    # less than its 10 MiB write chunk had arrived); the second download sent none.
    assert hub.gets("big-Q4_K_M.gguf") == [None, None]
