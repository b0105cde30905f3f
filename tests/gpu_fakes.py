"""Test doubles for GPU hosts: a fake `nvidia-smi` on PATH and a Hugging Face cache laid out
in huggingface_hub's own format."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import HarnessConfig
from neuronctl.models.hub import Fetcher

TESTS = Path(__file__).parent
FAKE_NVIDIA_SMI = TESTS / "fake_nvidia_smi.py"
DATA = TESTS / "data"


def wrapper(path: Path, script: Path) -> Path:
    """An executable `path` that runs `script` with this interpreter."""
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    path.chmod(0o755)
    return path


def gpu(index: int, free: int, total: int = 40960, **extra: Any) -> dict[str, Any]:
    return {"index": index, "name": "NVIDIA A100-SXM4-40GB", "total": total,
            "used": total - free, "free": free, "util": 0, "temp": 35,
            "driver": "535.129.03", **extra}


class FakeSmi:
    """Controls the answers of the `nvidia-smi` a test put on PATH."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.state: dict[str, Any] = {"gpus": [], "apps": {}, "cuda": "12.2"}
        self.write()

    def write(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)  # atomic: a concurrent nvidia-smi never reads half

    def set(self, **changes: Any) -> None:
        self.state.update(changes)
        self.write()

    def calls(self) -> list[str]:
        calls = self.state_path.with_name(self.state_path.name + ".calls")
        return calls.read_text().splitlines() if calls.exists() else []


def install_fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    fake = FakeSmi(tmp_path / "nvidia-smi.json")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_STATE", str(fake.state_path))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return fake


def hide_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))


def lay_out_hf_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], *,
    commit: str = "0123456789abcdef0123456789abcdef01234567", refs: tuple[str, ...] = ("main",),
) -> Path:
    """Put `files` in `cache` as huggingface_hub stores a download: the content in
    blobs/<sha256>, a relative link to it from snapshots/<commit>/<name>, and refs/<ref>
    holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


class FakeHub:
    """Stands in for HfApi.list_repo_tree and hf_hub_download: writes into the cache as
    huggingface_hub does (an .incomplete blob growing, then the snapshot link) and drives
    the progress bar class it is given. `gate` holds each download midway."""

    def __init__(self, cache: Path, files: dict[str, bytes]) -> None:
        self.cache, self.files = cache, files
        self.downloads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.midway = threading.Event()
        self.finished = threading.Event()

    def list_repo_tree(self, repo_id: str, revision: str | None = None,
                       recursive: bool = False) -> list[Any]:
        from huggingface_hub.hf_api import RepoFile, RepoFolder

        entries: list[Any] = [RepoFolder(path="BF16", oid="0" * 40)]
        for name, content in self.files.items():
            entries.append(RepoFile(path=name, size=len(content), oid="0" * 40))
        return entries

    def download(self, repo_id: str, filename: str, *, revision: str | None,
                 cache_dir: str, tqdm_class: Any = None) -> str:
        self.downloads.append(filename)
        content = self.files[filename]
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        incomplete = blob.with_name(blob.name + ".incomplete")
        half = len(content) // 2
        bar = tqdm_class(total=len(content), initial=0, desc=filename, unit="B",
                         name="huggingface_hub.http_get")
        try:
            incomplete.write_bytes(content[:half])
            bar.update(half)
            self.midway.set()
            self.gate.wait(30)
            incomplete.write_bytes(content)
            bar.update(len(content) - half)
        finally:
            bar.close()
        incomplete.rename(blob)
        link = repo / "snapshots" / ("9" * 40) / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("9" * 40)
        self.finished.set()
        return str(link)

    def fetcher(self, defaults: HarnessConfig) -> Fetcher:
        return Fetcher(defaults.hf_cache, offline=False, api=self, download=self.download)
