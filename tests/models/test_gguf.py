"""Hostile GGUF headers: every count and length checked against the file, the reading done
in a bounded child process, and a model whose file lies refused without holding up others.

The hostile files are built here with `struct` (a few hundred bytes each); the honest one is
tests/tiny_gguf.py's, compared with what gguf's own reader says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import sys
import time
from pathlib import Path

import psutil
import pytest

from neuronctl.config import ModelSpec
from neuronctl.errors import LoadError, ModelFileError
from neuronctl.models import gguf as ggufinfo
from neuronctl.models import headers
from neuronctl.models.admission import VramGate
from neuronctl.models.gguf import BadHeader, CannotEstimate, read_model
from neuronctl.models.headers import read_bounded
from neuronctl.states import ModelStatus, WorkerState

from ..gpu_fakes import FakeSmi, gpu, install_fake_smi
from ..helpers import MakeRegistry, poll_until_async

U32, I32, U64, STRING, ARRAY = 4, 5, 10, 8, 9
F32 = 0
REFUSED_WITHIN_S = 5.0  # generous on a loaded machine; a refusal takes ~30 ms


def gguf_string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: bytes, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def tensor_info(name: bytes, dims: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def header(n_tensors: int, n_kv: int, body: bytes = b"", *, version: int = 3,
           magic: bytes = b"GGUF", size: int | None = None) -> bytes:
    data = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body
    return data.ljust(size or len(data), b"\0")


ARCH = kv(b"general.architecture", STRING, gguf_string(b"llama"))

BOMBS = {
    "huge tensor count": (
        header(2**32 - 1, 1, ARCH, size=280),
        "tensor count 4294967295 cannot fit in a 280-byte file"),
    "huge kv count": (
        header(0, 2**63, size=280), f"kv count {2**63} cannot fit in a 280-byte file"),
    "huge key length": (
        header(0, 1, struct.pack("<Q", 2**40), size=280),
        "key 0: a string of 1099511627776 bytes cannot fit"),
    "huge string value": (
        header(0, 2, ARCH + kv(b"general.name", STRING, struct.pack("<Q", 2**62)), size=280),
        f"'general.name': a string of {2**62} bytes cannot fit"),
    "huge array": (
        header(0, 2, ARCH + kv(b"tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, 2**50)),
               size=280),
        f"'tokenizer.ggml.scores': an array of {2**50} items cannot fit"),
    "huge string array": (
        header(0, 2, ARCH + kv(b"tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", 8, 2**40)),
               size=280),
        f"'tokenizer.ggml.tokens': an array of {2**40} items cannot fit"),
    "block_count 2**40 with a per-layer head array": (
        header(1, 3, ARCH + kv(b"llama.block_count", U64, struct.pack("<Q", 2**40))
               + kv(b"llama.attention.head_count_kv", ARRAY,
                    struct.pack("<IQ", I32, 4) + struct.pack("<4i", 8, 8, 8, 8))
               + tensor_info(b"t", [8]), size=320),
        "block_count 1099511627776 is implausible for a model of 1 tensors"),
    "huge per-layer head array": (
        header(0, 2, ARCH + kv(b"llama.attention.head_count", ARRAY,
                               struct.pack("<IQ", I32, 2**40)), size=280),
        f"'llama.attention.head_count': an array of {2**40} items cannot fit"),
    "wrong magic": (
        header(0, 0, magic=b"GGML", size=64), "not a GGUF file (no GGUF magic)"),
    "version 1": (header(0, 0, version=1, size=64), "GGUF version 1 is not supported"),
    "too short": (b"GGUF\x03\0\0\0", "a 8-byte file is too short for a GGUF header"),
    "dims overflow": (
        header(1, 1, ARCH + tensor_info(b"blk.0.attn_q.weight", [2**40, 2**40]), size=280),
        "tensor 'blk.0.attn_q.weight': dims 1099511627776 x 1099511627776 overflow"),
    "too many dims": (
        header(1, 1, ARCH + tensor_info(b"t", [1] * 9), size=280), "tensor 't' has 9 dimensions"),
    "tensor data past the end": (
        header(1, 1, ARCH + tensor_info(b"t", [2**30]), size=280),
        # its 2**32 bytes start at 128, the header rounded up to the 32-byte alignment
        "the data of tensor 't' ends at byte 4294967424, past the end of the 280-byte file"),
    "unknown value type": (header(0, 1, kv(b"x", 77, b"\0" * 8), size=280),
                           "'x' has an unknown value type 77"),
    "array of arrays": (header(0, 1, kv(b"x", ARRAY, struct.pack("<IQ", ARRAY, 1)), size=280),
                        "'x' is an array of arrays"),
}


@pytest.mark.parametrize("name", list(BOMBS))
async def test_a_hostile_header_is_refused_fast_with_its_reason(tmp_path: Path, name: str) -> None:
    data, reason = BOMBS[name]
    path = tmp_path / "bomb.gguf"
    path.write_bytes(data)
    with pytest.raises(BadHeader) as info:
        read_model([path])  # in-process: the checks alone stop it
    assert reason in str(info.value) and "\n" not in str(info.value)
    started = time.monotonic()
    with pytest.raises(BadHeader) as bounded:
        await read_bounded([path])  # the child the daemon runs
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert str(bounded.value) == str(info.value)


async def test_the_supervisor_does_not_grow_while_bombs_are_read(tmp_path: Path) -> None:
    me = psutil.Process()
    paths = []
    for i, (data, _) in enumerate(BOMBS.values()):
        paths.append(tmp_path / f"bomb{i}.gguf")
        paths[-1].write_bytes(data)
    before = me.memory_info().rss
    for path in paths:
        with pytest.raises(BadHeader):
            await read_bounded([path])
    assert me.memory_info().rss - before < 50 * 1024 * 1024
    assert me.children() == []  # every child reaped


def test_truncated_honest_file_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (20, 200, 2000, 20000, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(BadHeader, match=r"runs past the end|cannot fit|too short|past the"):
            read_model([path])


def test_an_unknown_tensor_type_only_means_no_estimate(tmp_path: Path) -> None:
    path = tmp_path / "new-quant.gguf"
    path.write_bytes(header(1, 1, ARCH + tensor_info(b"t", [32], ggml_type=99), size=280))
    with pytest.raises(CannotEstimate, match="tensor 't' has ggml type 99"):
        read_model([path])


async def test_the_honest_file_reads_as_ggufs_own_reader_says(tiny_gguf: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(tiny_gguf))
    ours = await read_bounded([tiny_gguf])
    assert ours.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert ours.tensor_count == len(reader.tensors)
    assert (ours.architecture, ours.block_count, ours.context_length) == ("llama", 2, 256)
    assert (ours.embedding_length, ours.head_count, ours.head_count_kv) == (64, 4, 4)
    split = await read_bounded([tiny_gguf, tiny_gguf])
    assert split.weights_bytes == 2 * ours.weights_bytes
    assert split.tensor_count == 2 * ours.tensor_count


def test_per_layer_heads_are_kept_up_to_block_count(tmp_path: Path) -> None:
    heads = struct.pack("<IQ", I32, 6) + struct.pack("<6i", 8, 4, 8, 4, 99, 99)
    body = (ARCH + kv_u32(b"llama.block_count", 4)
            + kv(b"llama.attention.head_count", ARRAY, heads)
            + b"".join(tensor_info(f"blk.{i}".encode(), [1]) for i in range(4)))
    path = tmp_path / "m.gguf"
    path.write_bytes(header(4, 3, body, size=1024))
    assert read_model([path]).head_count == [8, 4, 8, 4]


def test_the_type_table_matches_gguf() -> None:
    from gguf import GGML_QUANT_SIZES

    assert {int(k): v for k, v in GGML_QUANT_SIZES.items()} == ggufinfo.GGML_TYPES


def test_the_child_imports_nothing_heavy(tiny_gguf: Path) -> None:
    import subprocess

    command = [*headers.child_command(), str(tiny_gguf)]
    command.insert(1, "-X")
    command.insert(2, "importtime")
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not imported & {"asyncio", "json", "dataclasses", "typing", "gguf", "numpy", "re"}
    assert '"weights_bytes":462080' in done.stdout


async def test_a_child_past_the_wall_clock_is_killed() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = time.monotonic()
    with pytest.raises(BadHeader, match=r"^reading the header took over 0.3 s$"):
        await read_bounded(["x.gguf"], timeout_s=0.3, command=sleeper)
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert psutil.Process().children() == []


async def test_cancelling_the_read_kills_the_child() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    reading = asyncio.create_task(read_bounded(["x.gguf"], command=sleeper))
    await poll_until_async(lambda: psutil.Process().children(), timeout=5)  # it has started
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert psutil.Process().children() == []


async def test_the_childs_memory_limit_refuses(tiny_gguf: Path) -> None:
    # Far below what the interpreter already maps: its first buffer fails.
    with pytest.raises(BadHeader, match=r"^reading the header needed over 1 MiB of memory$"):
        await read_bounded([tiny_gguf], memory_bytes=1 << 20)


async def test_the_childs_cpu_limit_refuses(tmp_path: Path) -> None:
    # Every key fits, but there are millions of them: only the CPU limit stops it.
    count = 1_500_000
    one = kv(b"k", 0, b"\0")
    path = tmp_path / "many-keys.gguf"
    path.write_bytes(header(0, count, one * count))
    with pytest.raises(BadHeader, match="over 1 s of CPU"):
        await read_bounded([path], cpu_s=1, timeout_s=60)


async def test_a_child_that_crashes_or_babbles_is_no_estimate() -> None:
    crash = [sys.executable, "-c", "import sys; sys.exit('boom')"]
    with pytest.raises(CannotEstimate, match="exited with code 1: boom"):
        await read_bounded(["x.gguf"], command=crash)
    babble = [sys.executable, "-c", "print('{not json')"]
    with pytest.raises(CannotEstimate, match="exited with code 0"):
        await read_bounded(["x.gguf"], command=babble)
    with pytest.raises(CannotEstimate, match="cannot start the header reader"):
        await read_bounded(["x.gguf"], command=["/nonexistent/python"])


# --- the daemon ----------------------------------------------------------------------------

@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSmi:
    return install_fake_smi(tmp_path, monkeypatch)


def fake(model_id: str, path: Path) -> ModelSpec:
    return ModelSpec(model_id, harness="fake", path=path, devices=(0,), n_ctx=256)


async def test_a_bomb_model_is_refused_and_others_load(
    fake_smi: FakeSmi, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(BOMBS["huge tensor count"][0])

    registry = make_registry()
    started = time.monotonic()
    with pytest.raises(ModelFileError) as info:
        await registry.load(fake("bomb", bomb))
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert info.value.status == 400
    assert info.value.message == (
        f"bomb: refused: the GGUF header of {bomb} cannot be trusted: "
        "tensor count 4294967295 cannot fit in a 280-byte file")
    record = registry.get("bomb")
    assert record is not None and record.status is ModelStatus.FAILED
    assert not registry.services.load_lock.locked()
    good = await registry.load(fake("good", tiny_gguf))
    assert good.status is ModelStatus.LOADED and good.vram_estimate_mb == 1
    # Force does not help a file that lies: its size is not the question.
    with pytest.raises(ModelFileError):
        await registry.load(dataclasses.replace(fake("bomb", bomb), force=True))


async def test_the_load_lock_is_free_while_a_header_is_read(
    fake_smi: FakeSmi, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    slow_file = tmp_path / "slow.gguf"
    slow_file.write_bytes(tiny_gguf.read_bytes())
    reading = asyncio.Event()

    async def reader(parts: object) -> ggufinfo.Header:
        assert isinstance(parts, tuple)
        if parts[0] == slow_file:
            reading.set()
            await asyncio.Event().wait()  # never answers: only a cancel ends it
        return await read_bounded(parts)

    registry = make_registry()
    services = registry.services
    services.vram_gate = VramGate(registry.discovery, lambda: 5.0, time.monotonic,
                                   header_reader=reader)
    slow = asyncio.create_task(registry.load(fake("slow", slow_file)))
    await asyncio.wait_for(reading.wait(), 10)
    record = registry.get("slow")
    assert record is not None and record.state is WorkerState.PENDING
    assert not services.load_lock.locked()
    fast = await registry.load(fake("fast", tiny_gguf))  # not held up by the slow read
    assert fast.status is ModelStatus.LOADED
    await registry.unload("slow")  # the read is cancelled: nothing hangs
    with pytest.raises(LoadError):
        await slow


async def test_the_header_is_read_once_and_only_where_a_gpu_judges_it(
    fake_smi: FakeSmi, make_registry: MakeRegistry, tiny_gguf: Path
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    read: list[Path] = []

    async def reader(parts: object) -> ggufinfo.Header:
        assert isinstance(parts, tuple)
        read.append(parts[0])
        return await read_bounded(parts)

    registry = make_registry()
    registry.services.vram_gate = VramGate(registry.discovery, lambda: 5.0, time.monotonic,
                                            header_reader=reader)
    await registry.load(fake("gpu", tiny_gguf))
    assert read == [tiny_gguf]  # before the lock; the check under it used what was read
    await registry.load(fake("gpu-too", tiny_gguf))
    assert read == [tiny_gguf]  # the same file, unchanged: not read again
    # No layers on a GPU: nothing to judge, no child started (a CPU node starts fast).
    cpu = await registry.load(ModelSpec("cpu", harness="fake", path=tiny_gguf))
    assert cpu.status is ModelStatus.LOADED and cpu.vram_estimate_mb is None
    assert read == [tiny_gguf]


async def test_a_header_is_read_again_only_when_its_file_changes(
    fake_smi: FakeSmi, make_registry: MakeRegistry, tiny_gguf: Path, tmp_path: Path
) -> None:
    fake_smi.set(gpus=[gpu(0, 30000)])
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    read: list[Path] = []

    async def reader(parts: object) -> ggufinfo.Header:
        assert isinstance(parts, tuple)
        read.append(parts[0])
        return await read_bounded(parts)

    registry = make_registry()
    registry.services.vram_gate = VramGate(registry.discovery, lambda: 5.0, time.monotonic,
                                            header_reader=reader)
    for _ in range(3):  # unloaded and loaded again: the verdict is remembered
        await registry.load(fake("m", model))
        await registry.unload("m")
    assert read == [model]
    # The same path, new contents (a new inode, size and mtime): read again, once.
    replacement = tmp_path / "new.gguf"
    replacement.write_bytes(tiny_gguf.read_bytes() + b"\0" * 64)
    os.replace(replacement, model)
    for _ in range(2):
        await registry.load(fake("m", model))
        await registry.unload("m")
    assert read == [model, model]
    # Touched in place (same inode, a new mtime): read again too.
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    await registry.load(fake("m", model))
    assert read == [model, model, model]


async def test_parameter_count_and_file_type_for_ollamas_details(tiny_gguf: Path) -> None:
    """What /api/tags shows as parameter size and quantization, through the child too."""
    from gguf import GGUFReader

    reader = GGUFReader(tiny_gguf)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    file_type = reader.fields["general.file_type"].contents()
    header = read_model([tiny_gguf])
    assert (header.parameter_count, header.file_type) == (elements, file_type)
    bounded = await read_bounded([tiny_gguf])
    assert bounded.as_json() == header.as_json()
