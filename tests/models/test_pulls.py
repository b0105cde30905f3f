"""Downloads without a load (models/pulls.py): one at a time, at the lowest priority, a
repeated request joining the pull under way, and the queue dropped at shutdown."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from neuronctl.config import HarnessConfig, ModelSpec
from neuronctl.models.pulls import DONE, DOWNLOADING, FAILED, QUEUED, Pulls

from ..gpu_fakes import FakeHub


class NiceHub(FakeHub):
    """Records the nice value of the thread each download runs in."""

    def __init__(self, cache: Path, files: dict[str, bytes]) -> None:
        super().__init__(cache, files)
        self.nice: list[int] = []

    def download(self, repo_id: str, filename: str, *, revision: str | None,
                 cache_dir: str, tqdm_class: Any = None) -> str:
        self.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                tqdm_class=tqdm_class)


@pytest.fixture
def hub(tmp_path: Path) -> NiceHub:
    return NiceHub(tmp_path / "hf", {"a-Q4_K_M.gguf": b"a" * 4000, "b-Q8_0.gguf": b"b" * 10})


def pulls_over(hub: NiceHub) -> Pulls:
    return Pulls(lambda name: HarnessConfig(hf_cache=hub.cache), hub.fetcher)


async def test_one_at_a_time_at_nice_19_and_a_second_request_joins(hub: NiceHub) -> None:
    hub.gate.clear()
    pulls = pulls_over(hub)
    first = pulls.request(ModelSpec("org/a-GGUF", quant="Q4_K_M"))
    second = pulls.request(ModelSpec("org/b-GGUF", quant="Q8_0"), "prefetch")
    assert pulls.request(ModelSpec("org/a-GGUF", quant="Q4_K_M")) is first
    await asyncio.to_thread(hub.midway.wait, 10)
    assert (first.state, second.state) == (DOWNLOADING, QUEUED)
    assert first.as_json()["file_done_bytes"] == 2000
    hub.gate.set()
    await asyncio.wait_for(second.done.wait(), 10)
    assert (first.state, second.state) == (DONE, DONE)
    assert hub.downloads == ["a-Q4_K_M.gguf", "b-Q8_0.gguf"]
    assert hub.nice == [19, 19]
    # Only the download's thread: the event loop's keeps its priority.
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19
    assert second.as_json()["by"] == "prefetch" and second.path is not None


async def test_prefetch_takes_hub_models_only_and_close_drops_the_queue(
        hub: NiceHub, tmp_path: Path) -> None:
    hub.gate.clear()
    pulls = pulls_over(hub)
    queued = pulls.prefetch([ModelSpec("org/a-GGUF", quant="Q4_K_M"),
                             ModelSpec("local", path=tmp_path / "x.gguf"),
                             ModelSpec("org/b-GGUF", quant="Q8_0")])
    assert [p.model_id for p in queued] == ["org/a-GGUF", "org/b-GGUF"]
    await asyncio.to_thread(hub.midway.wait, 10)
    try:
        await asyncio.wait_for(pulls.close(), 10)
    finally:
        hub.gate.set()
    assert [p.state for p in queued] == [FAILED, FAILED]
    assert queued[1].error == "cancelled: the node is stopping"
    assert hub.downloads == ["a-Q4_K_M.gguf"]


async def test_a_failed_pull_keeps_its_reason(hub: NiceHub) -> None:
    pulls = pulls_over(hub)
    pull = pulls.request(ModelSpec("org/a-GGUF", quant="Q2_K"))
    await asyncio.wait_for(pull.done.wait(), 10)
    assert pull.state == FAILED and pull.code == "model_file_not_found"
    assert "no GGUF file with quant Q2_K" in (pull.error or "")
    with pytest.raises(ValueError, match="local path"):
        pulls.request(ModelSpec("local", path=Path("/x.gguf")))
