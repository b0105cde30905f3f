"""VRAM: what a model will need, whether its devices have it, and when a stopped worker's
memory is free again.

The estimate is what llama.cpp allocates for the bulk of a model: its tensors, as the GGUF
header lists them, plus an f16 KV cache for the context size. Compute buffers come on top,
so it is a floor, not a promise; `force = true` loads regardless.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .discovery import Gpu
from .errors import NotEnoughVram

MIB = 1024 * 1024
_KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type is f16


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    kv_bytes: int
    n_ctx: int | None  # the context the KV cache was sized for
    gpu_fraction: float = 1.0  # share of the layers offloaded

    @property
    def total_mb(self) -> int:
        return math.ceil((self.weights_bytes + self.kv_bytes) * self.gpu_fraction / MIB)

    def describe(self) -> str:
        weights = math.ceil(self.weights_bytes * self.gpu_fraction / MIB)
        kv = math.ceil(self.kv_bytes * self.gpu_fraction / MIB)
        share = "" if self.gpu_fraction >= 1 else f", {self.gpu_fraction:.0%} of the layers"
        return f"weights {weights} MiB + KV cache {kv} MiB for n_ctx {self.n_ctx}{share}"


def _value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    # gguf < 0.11: the value sits in `parts`, indexed by `data`.
    values = [field.parts[i].tolist() for i in field.data]
    flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
    return flat[0] if len(flat) == 1 else flat


def _per_layer(value: Any, n_layers: int) -> list[int]:
    # Some architectures give a head count per layer (an array) rather than one number.
    if isinstance(value, list):
        return [int(v) for v in value][:n_layers]
    return [int(value)] * n_layers


def estimate(parts: Sequence[Path], n_ctx: int | None, n_gpu_layers: int | None) -> Estimate:
    """Read the GGUF header(s) of a model (all parts of a split one) and size it.

    `n_ctx` None or 0 means the model's own context length; `n_gpu_layers` None or
    negative means all layers.
    """
    from gguf import GGUFReader

    weights = 0
    first: Any = None
    for path in parts:
        reader = GGUFReader(str(path))
        weights += sum(int(t.n_bytes) for t in reader.tensors)
        if first is None:
            first = reader
    arch = _value(first, "general.architecture")
    n_layers = _value(first, f"{arch}.block_count")
    ctx = n_ctx or _value(first, f"{arch}.context_length")
    kv = 0
    if isinstance(n_layers, int) and isinstance(ctx, int) and n_layers > 0:
        n_embd = _value(first, f"{arch}.embedding_length")
        heads = _value(first, f"{arch}.attention.head_count")
        heads_kv = _value(first, f"{arch}.attention.head_count_kv")
        if heads_kv is None:
            heads_kv = heads
        if isinstance(n_embd, int) and heads is not None:
            head_dim = n_embd // max(1, _per_layer(heads, 1)[0])
            k_len = _value(first, f"{arch}.attention.key_length") or head_dim
            v_len = _value(first, f"{arch}.attention.value_length") or head_dim
            kv = sum(h * (int(k_len) + int(v_len)) for h in _per_layer(heads_kv, n_layers))
            kv *= ctx * _KV_BYTES_PER_ELEMENT
    fraction = 1.0
    layers = n_layers if isinstance(n_layers, int) else 0
    if n_gpu_layers is not None and 0 <= n_gpu_layers < layers:
        fraction = n_gpu_layers / layers
    return Estimate(weights, kv, ctx if isinstance(ctx, int) else None, fraction)


def admit(model_id: str, need: Estimate, gpus: Sequence[Gpu], devices: Sequence[int]) -> None:
    """Raise NotEnoughVram unless `devices` have the memory `need` says, together."""
    by_index = {g.index: g for g in gpus}
    missing = [d for d in devices if d not in by_index]
    if missing:
        have = ", ".join(str(g.index) for g in gpus) or "none"
        raise NotEnoughVram(
            f"{model_id}: no GPU {', '.join(map(str, missing))} on this host (GPUs: {have}); "
            "set force = true to load anyway"
        )
    free = [by_index[d].memory_free_mb for d in devices]
    if any(f is None for f in free):
        return  # the driver does not say: nothing to judge by
    free_mb = sum(f for f in free if f is not None)
    if need.total_mb > free_mb:
        names = ", ".join(map(str, devices))
        raise NotEnoughVram(
            f"{model_id}: not enough free VRAM: needs about {need.total_mb} MiB "
            f"({need.describe()}) but GPU {names} {'has' if len(devices) == 1 else 'have'} "
            f"{free_mb} MiB free; set force = true to load anyway"
        )


def split_by_free(devices: Sequence[int], gpus: Sequence[Gpu]) -> tuple[float, ...]:
    """A tensor split for several devices: in proportion to their free VRAM, or even."""
    by_index = {g.index: g for g in gpus}
    free = [by_index[d].memory_free_mb if d in by_index else None for d in devices]
    if all(f for f in free):
        return tuple(float(f) for f in free if f)
    return tuple(1.0 for _ in devices)


@dataclass(frozen=True)
class Release:
    """VRAM a stopped worker held, not yet seen free again."""

    model_id: str
    pids: frozenset[int]
    devices: tuple[int, ...]
    accounted: bool  # its pids were in nvidia-smi's per-process list while it ran
    held_mb: int | None = None
    used_before_mb: int | None = None  # its devices' used memory right before the stop

    def freed(self, gpus: Iterable[Gpu], listed: set[int] | None) -> bool:
        if listed is not None and self.pids & listed:
            return False  # the driver still lists its process
        if self.accounted:
            return True
        # No per-process accounting (a container, say): the devices' used memory must have
        # dropped by a good part of what it held.
        if self.held_mb is None or self.used_before_mb is None:
            return True
        used = sum(g.memory_used_mb or 0 for g in gpus if g.index in self.devices)
        return used <= self.used_before_mb - self.held_mb // 2
