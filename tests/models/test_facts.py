"""`neuronctl show`'s facts: the header as read by the bounded child (the tiny model, and
crafted headers: an embedding model, a hostile file), and the fit verdict per GPU from the
fake nvidia-smi."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from neuronctl.config import HarnessConfig, ModelSpec, NeuronConfig
from neuronctl.models import facts
from neuronctl.models.discovery import Discovery, Gpu
from neuronctl.models.gguf import BadHeader
from neuronctl.models.hub import ResolveError

from ..gpu_fakes import gpu, install_fake_smi, lay_out_hf_cache
from .test_gguf import ARCH, STRING, U32, gguf_string, header, kv, kv_u32, tensor_info

MIB = 1024 * 1024


def a_gpu(index: int, free_mb: int, total_mb: int = 8192) -> Gpu:
    return Gpu(index, "NVIDIA L4", total_mb, total_mb - free_mb, free_mb, 0, 30, "550")


async def test_the_tiny_model_as_its_header_says(tiny_gguf: Path) -> None:
    config = NeuronConfig()
    spec = ModelSpec("tiny", path=tiny_gguf, n_ctx=128)
    shown = await facts.show(config, spec, (tiny_gguf,), [])
    head = shown["header"]
    assert head["architecture"] == "llama"
    assert head["layers"] == 2 and head["context_length"] == 256
    assert head["chat_template"] is True and head["embedding_model"] is False
    assert head["parameters"] > 0 and head["parameters_label"].endswith("K")
    assert head["quantization"] == "F32"
    configured, trained = shown["estimate"]["configured"], shown["estimate"]["trained"]
    assert (configured["n_ctx"], trained["n_ctx"]) == (128, 256)
    assert trained["kv_bytes"] == 2 * configured["kv_bytes"]
    assert shown["size_bytes"] == tiny_gguf.stat().st_size


def crafted(tmp_path: Path, *, pooling: bool, template: bool, file_type: int) -> Path:
    keys = [ARCH, kv_u32(b"llama.block_count", 1), kv_u32(b"llama.context_length", 512),
            kv_u32(b"general.file_type", file_type)]
    if pooling:
        keys.append(kv_u32(b"llama.pooling_type", 1))
    if template:
        keys.append(kv(b"tokenizer.chat_template", STRING, gguf_string(b"{{ x }}" * 1000)))
    body = b"".join(keys) + tensor_info(b"w", [1000, 2])
    data = header(1, len(keys), body)
    data += b"\0" * (-len(data) % 32) + b"\0" * 8000
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    return path


async def test_crafted_headers_say_embedding_template_and_quantization(
        tmp_path: Path) -> None:
    path = crafted(tmp_path, pooling=True, template=False, file_type=15)
    shown = await facts.show(NeuronConfig(), ModelSpec("e", path=path), (path,), [])
    head = shown["header"]
    assert (head["embedding_model"], head["chat_template"], head["quantization"],
            head["parameters"], head["layers"]) == (True, False, "Q4_K_M", 2000, 1)
    path = crafted(tmp_path, pooling=False, template=True, file_type=7)
    head = (await facts.show(NeuronConfig(), ModelSpec("c", path=path), (path,), []))["header"]
    assert (head["embedding_model"], head["chat_template"], head["quantization"]) == \
        (False, True, "Q8_0")


async def test_a_hostile_header_is_refused_as_at_a_load(tmp_path: Path) -> None:
    path = tmp_path / "bomb.gguf"
    path.write_bytes(header(2**32 - 1, 1, ARCH, size=280))
    with pytest.raises(BadHeader, match="tensor count 4294967295 cannot fit"):
        await facts.show(NeuronConfig(), ModelSpec("b", path=path), (path,), [])


def test_the_verdicts_in_words() -> None:
    gpus = [a_gpu(0, free_mb=4096), a_gpu(1, free_mb=1024)]
    fits, short = facts.verdicts(1024 + 512, gpus, ())
    assert fits["fits"] and fits["verdict"] == "fits on GPU 0 with 2.5 GiB to spare"
    assert not short["fits"]
    assert short["verdict"] == "does not fit: needs 1.5 GiB, GPU 1 has 1.0 GiB free"
    (only,) = facts.verdicts(100, gpus, (1,))  # the model's own `devices`
    assert only["gpu"] == 1 and only["fits"]


async def test_the_fit_against_the_fake_nvidia_smi(tiny_gguf: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    smi = install_fake_smi(tmp_path, monkeypatch)
    smi.set(gpus=[gpu(0, free=8000, total=8192), gpu(1, free=0, total=8192)])
    discovery = Discovery()
    try:
        gpus = await discovery.refresh()
    finally:
        await discovery.close()
    shown = await facts.show(NeuronConfig(), ModelSpec("tiny", path=tiny_gguf), (tiny_gguf,),
                             gpus)
    verdicts = shown["estimate"]["configured"]["gpus"]
    assert [v["fits"] for v in verdicts] == [True, False]
    assert verdicts[0]["verdict"].startswith("fits on GPU 0 with 7.")
    assert verdicts[1]["verdict"] == "does not fit: needs 1 MiB, GPU 1 has 0 B free"


def test_a_cached_model_is_found_without_downloading(tmp_path: Path) -> None:
    cache = tmp_path / "hf"
    snapshot = lay_out_hf_cache(cache, "org/m-GGUF", {"m-Q8_0.gguf": b"GGUF"})
    config = NeuronConfig(harness={"llama-cpp-python": HarnessConfig(hf_cache=cache)})
    assert facts.local_parts(config, ModelSpec("org/m-GGUF", quant="Q8_0")) == \
        (snapshot / "m-Q8_0.gguf",)
    with pytest.raises(ResolveError, match="not in the cache") as raised:
        facts.local_parts(config, ModelSpec("org/other-GGUF"))
    # `show` reads the cache only by design: no environment variable is to blame.
    assert "HF_HUB_OFFLINE" not in raised.value.message


def test_struct_helpers_agree() -> None:  # the crafted files above use test_gguf's layout
    assert kv_u32(b"k", 1) == gguf_string(b"k") + struct.pack("<II", U32, 1)
