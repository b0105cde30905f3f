"""`neuronctl show`: what a model's GGUF header says, and whether it fits each GPU.

The header is read by the bounded child (headers.read_bounded), so a hostile file is
refused here as it is at a load; the estimate is vram.py's, at the context the config
gives the model and at the one it was trained for, against each GPU's total and free
memory as nvidia-smi said it (discovery.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ModelSpec, NeuronConfig, effective, gpu_layers
from ..units import fmt_bytes
from . import gguf, vram
from .discovery import Gpu
from .gguf import Header
from .headers import read_bounded
from .hub import Fetcher, Progress, from_hub

MIB = 1024 * 1024

# Encoders without a pooling key in older conversions are embedding models all the same.
_EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert", "jina-bert-v2", "t5encoder"})


def local_parts(config: NeuronConfig, spec: ModelSpec) -> tuple[Path, ...]:
    """The model's files on this host: its `path` (every part of a split one), or what the
    cache holds for it, never downloaded (ResolveError: `neuronctl pull` it first)."""
    from .files import local_file

    if not from_hub(spec):
        return local_file(spec).parts
    cache = config.harness_config(spec.harness).hf_cache
    return Fetcher(cache, offline=True).resolve(spec, Progress()).parts


def parameters(count: int | None) -> str | None:
    if not count:
        return None
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def header_facts(header: Header) -> dict[str, Any]:
    arch = header.architecture
    pooling = header.pooling_type
    return {
        "architecture": arch,
        "parameters": header.parameter_count,
        "parameters_label": parameters(header.parameter_count),
        "quantization": gguf.FILE_TYPES.get(header.file_type, f"type {header.file_type}")
        if header.file_type is not None else None,
        "context_length": header.context_length,
        "layers": header.block_count,
        "embedding_length": header.embedding_length,
        "chat_template": bool(header.chat_template),
        "embedding_model": (pooling is not None and pooling > 0)
        or (arch or "") in _EMBEDDING_ARCHITECTURES,
        "weights_bytes": header.weights_bytes,
        "tensors": header.tensor_count,
    }


def verdicts(need_mb: int, gpus: Sequence[Gpu], devices: Sequence[int]) -> list[dict[str, Any]]:
    """Per GPU the model may use (`devices`, else every one): does the estimate fit its free
    memory, in words an operator reads."""
    chosen = [g for g in gpus if not devices or g.index in devices]
    answers = []
    for gpu in chosen:
        free = gpu.memory_free_mb
        fits = free is not None and need_mb <= free
        if free is None:
            said = f"GPU {gpu.index} does not report its free memory"
        elif fits:
            said = f"fits on GPU {gpu.index} with {fmt_bytes((free - need_mb) * MIB)} to spare"
        else:
            said = (f"does not fit: needs {fmt_bytes(need_mb * MIB)}, GPU {gpu.index} has "
                    f"{fmt_bytes(free * MIB)} free")
        answers.append({"gpu": gpu.index, "name": gpu.name, "total_mb": gpu.memory_total_mb,
                        "free_mb": free, "fits": fits, "verdict": said})
    return answers


def estimate_at(header: Header, n_ctx: int | None, n_gpu_layers: int | None,
                gpus: Sequence[Gpu], devices: Sequence[int]) -> dict[str, Any]:
    need = vram.estimate(header, n_ctx, n_gpu_layers)
    return {"n_ctx": need.n_ctx, "need_mb": need.total_mb,
            "need_bytes": math.ceil((need.weights_bytes + need.kv_bytes) * need.gpu_fraction),
            "weights_bytes": need.weights_bytes, "kv_bytes": need.kv_bytes,
            "describe": need.describe(), "gpus": verdicts(need.total_mb, gpus, devices)}


async def show(config: NeuronConfig, spec: ModelSpec, parts: Sequence[Path],
               gpus: Sequence[Gpu]) -> dict[str, Any]:
    """Everything `show` prints, as JSON. Raises BadHeader for a header that lies,
    CannotEstimate for one this reader cannot size."""
    header = await read_bounded(parts)
    defaults = config.harness_config(spec.harness)
    n_ctx = effective(spec, defaults, "n_ctx")
    layers = gpu_layers(spec, defaults)
    configured = estimate_at(header, n_ctx, layers, gpus, spec.devices)
    trained = (estimate_at(header, header.context_length, layers, gpus, spec.devices)
               if header.context_length and header.context_length != configured["n_ctx"]
               else configured)
    return {
        "id": spec.model_id, "path": str(parts[0]), "parts": len(parts),
        "size_bytes": sum(p.stat().st_size for p in parts),
        "header": header_facts(header),
        "n_gpu_layers": layers,
        "estimate": {"configured": configured, "trained": trained},
        "gpus_seen": len(gpus),
    }
