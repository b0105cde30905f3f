"""VRAM: what a model will need, whether its devices have it, and when a stopped worker's
memory is free again.

The estimate is what llama.cpp allocates for the bulk of a model: its tensors, as the GGUF
header lists them, plus an f16 KV cache for the context size. Compute buffers come on top,
so it is a floor, not a promise; `force = true` loads regardless. Every layer's KV is counted
at the full context, sliding-window layers too: that is what llama-server holds with
`--swa-full`, which a worker with a prompt cache runs with (supervisor/promptcache.py), and
more than it holds without. The header itself is read
by gguf.py, in a bounded child process; this module only does the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import NoSuchGpu, NotEnoughVram
from .discovery import Gpu
from .gguf import Header

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


def _first(value: int | list[int]) -> int:
    # Some architectures give a head count per layer (an array) rather than one number.
    if isinstance(value, list):
        return value[0] if value else 0
    return value


def _over_layers(value: int | list[int], n_layers: int) -> int:
    """The sum over the layers of a per-layer value (an array longer than the model is cut
    short, as llama.cpp reads only its layers' entries)."""
    if isinstance(value, list):
        return sum(value[:n_layers])
    return value * n_layers


def estimate(header: Header, n_ctx: int | None, n_gpu_layers: int | None) -> Estimate:
    """Size a model from its GGUF header (ggufinfo.read_model: all parts of a split one).

    `n_ctx` None or 0 means the model's own context length; `n_gpu_layers` None or
    negative means all layers.
    """
    n_layers = header.block_count
    ctx = n_ctx or header.context_length
    kv = 0
    if n_layers is not None and ctx is not None and n_layers > 0:
        heads = header.head_count
        heads_kv = heads if header.head_count_kv is None else header.head_count_kv
        n_embd = header.embedding_length
        if n_embd is not None and heads is not None and heads_kv is not None:
            head_dim = n_embd // max(1, _first(heads))
            k_len = header.key_length or head_dim
            v_len = header.value_length or head_dim
            kv = _over_layers(heads_kv, n_layers) * (k_len + v_len) * ctx * _KV_BYTES_PER_ELEMENT
    fraction = 1.0
    layers = n_layers or 0
    if n_gpu_layers is not None and 0 <= n_gpu_layers < layers:
        fraction = n_gpu_layers / layers
    return Estimate(header.weights_bytes, kv, ctx, fraction)


def check_fits(model_id: str, need: Estimate, gpus: Sequence[Gpu], devices: Sequence[int]) -> None:
    """Raise NotEnoughVram unless `devices` have the memory `need` says, together."""
    by_index = {g.index: g for g in gpus}
    missing = [d for d in devices if d not in by_index]
    if missing:
        have = ", ".join(str(g.index) for g in gpus) or "none"
        raise NoSuchGpu(
            f"{model_id}: no GPU {', '.join(map(str, missing))} on this host (GPUs: {have}); "
            "set force = true to load anyway"
        )
    free = [by_index[d].memory_free_mb for d in devices]
    if any(f is None for f in free):
        return  # the driver does not say: nothing to judge by
    free_mb = sum(f for f in free if f is not None)
    if need.total_mb > free_mb:
        names = ", ".join(map(str, devices))
        short = NotEnoughVram(
            f"{model_id}: not enough free VRAM: needs about {need.total_mb} MiB "
            f"({need.describe()}) but GPU {names} {'has' if len(devices) == 1 else 'have'} "
            f"{free_mb} MiB free; set force = true to load anyway"
        )
        short.short_mb = need.total_mb - free_mb
        raise short


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
