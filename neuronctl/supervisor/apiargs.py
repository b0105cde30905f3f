"""Which worker flags a client of the API may pass in `args`: an allow-list per harness.

`args` in the config are the operator's and are trusted (the reserved flags aside, see
harness.py). `args` in `POST /models/load` come from whoever can reach the API, and
llama-server has grown flags that are tools of their own: `--tools` runs shell commands,
`--chat-template-file` with `--verbose` reads files into answers, `--log-file` truncates
files, `-mmu` fetches URLs. A deny-list goes stale with every llama.cpp release, so the API
may use only the flags listed here: performance and sampling knobs, each with its value's
type checked. Nothing here names a file, a URL, a directory, a prefix, tools or agents,
logging or a web UI. An operator who needs more names the flags in `[harness.NAME]
api_args` (docs/security.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..config import ConfigError

# A value checker: the reason a value is refused, or None.
Check = Callable[[str], "str | None"]

_INT = re.compile(r"-?[0-9]{1,10}")
_LLAMA_BOOL = frozenset({"1", "on", "t", "true", "y", "yes", "0", "off", "f", "false", "n",
                         "no"})


def _int(value: str) -> str | None:
    return None if _INT.fullmatch(value) else "expected an integer"


def _int_range(low: int, high: int) -> Check:
    """An integer within [low, high]: flags that size threads, buffers and caches are
    resources a client must not be able to ask for without end (3,000 HTTP threads, say)."""

    def check(value: str) -> str | None:
        if not _INT.fullmatch(value):
            return "expected an integer"
        if not low <= int(value) <= high:
            return f"expected an integer from {low} to {high}"
        return None

    return check


_THREADS = _int_range(-1, 1024)
_TOKENS = _int_range(-1, 1 << 24)  # counts of tokens: -1 is "no limit" where llama.cpp has it
_BATCH = _int_range(1, 1 << 20)


def _float(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return "expected a number"
    return None if math.isfinite(number) and len(value) <= 32 else "expected a finite number"


def _choice(*choices: str) -> Check:
    allowed = frozenset(choices)

    def check(value: str) -> str | None:
        return None if value in allowed else f"expected one of {', '.join(sorted(allowed))}"

    return check


def _bool(value: str) -> str | None:
    return None if value.lower() in _LLAMA_BOOL else "expected true or false"


# llama-server's sampler names, joined by ';' (--samplers) or as letters (--sampling-seq).
_SAMPLER_NAMES = re.compile(r"[a-z_]{1,20}(;[a-z_]{1,20}){0,15}")
_SAMPLER_LETTERS = re.compile(r"[a-z]{1,16}")
_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def _pattern(pattern: re.Pattern[str], what: str) -> Check:
    def check(value: str) -> str | None:
        return None if pattern.fullmatch(value) else f"expected {what}"

    return check


@dataclass(frozen=True)
class Flag:
    """One allowed flag: its spellings and how its value is checked (None: it takes none)."""

    names: tuple[str, ...]
    value: Check | None = None


def _flags(*flags: Flag) -> Mapping[str, Flag]:
    return {name: flag for flag in flags for name in flag.names}


_ON_OFF_AUTO = _choice("on", "off", "auto")

LLAMA_SERVER_API_FLAGS = _flags(
    # Threads and batching.
    Flag(("-t", "--threads"), _THREADS), Flag(("-tb", "--threads-batch"), _THREADS),
    Flag(("--threads-http",), _int_range(-1, 256)), Flag(("--prio",), _int_range(-1, 3)),
    Flag(("--poll",), _int_range(0, 100)),
    Flag(("-b", "--batch-size"), _BATCH), Flag(("-ub", "--ubatch-size"), _BATCH),
    Flag(("-cb", "--cont-batching")), Flag(("-nocb", "--no-cont-batching")),
    Flag(("--numa",), _choice("distribute", "isolate", "numactl")),
    # Memory, KV cache and attention.
    Flag(("-fa", "--flash-attn"), _ON_OFF_AUTO),
    Flag(("-ctk", "--cache-type-k"), _choice(*_CACHE_TYPES)),
    Flag(("-ctv", "--cache-type-v"), _choice(*_CACHE_TYPES)),
    Flag(("-kvu", "--kv-unified")), Flag(("-no-kvu", "--no-kv-unified")),
    Flag(("-kvo", "--kv-offload")), Flag(("-nkvo", "--no-kv-offload")),
    Flag(("--swa-full",)), Flag(("-cram", "--cache-ram"), _int_range(0, 1 << 24)),
    Flag(("--repack",)), Flag(("-nr", "--no-repack")),
    Flag(("--cache-reuse",), _int_range(0, 1 << 24)), Flag(("-dt", "--defrag-thold"), _float),
    Flag(("--mlock",)), Flag(("--mmap",)), Flag(("--no-mmap",)),
    Flag(("--context-shift",)), Flag(("--no-context-shift",)),
    Flag(("--keep",), _TOKENS), Flag(("-n", "--predict", "--n-predict"), _TOKENS),
    Flag(("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"), _int_range(0, 256)),
    Flag(("--warmup",)), Flag(("--no-warmup",)),
    Flag(("-sps", "--slot-prompt-similarity"), _float),
    # Placement on GPUs (which GPUs is the spec's `devices`).
    Flag(("-ngl", "--gpu-layers", "--n-gpu-layers"), _int_range(-1, 1 << 16)),
    Flag(("-sm", "--split-mode"), _choice("none", "layer", "row", "tensor")),
    Flag(("-mg", "--main-gpu"), _int_range(0, 256)),
    Flag(("-cmoe", "--cpu-moe")), Flag(("-ncmoe", "--n-cpu-moe"), _int_range(0, 1 << 16)),
    Flag(("-fit", "--fit"), _choice("on", "off")),
    # RoPE and YaRN.
    Flag(("--rope-scaling",), _choice("none", "linear", "yarn")),
    Flag(("--rope-scale",), _float), Flag(("--rope-freq-base",), _float),
    Flag(("--rope-freq-scale",), _float), Flag(("--yarn-orig-ctx",), _TOKENS),
    *(Flag((f"--yarn-{name}",), _float)
      for name in ("ext-factor", "attn-factor", "beta-slow", "beta-fast")),
    # Embeddings and reranking.
    Flag(("--embedding", "--embeddings")), Flag(("--rerank", "--reranking")),
    Flag(("--pooling",), _choice("none", "mean", "cls", "last", "rank")),
    Flag(("--embd-normalize",), _int_range(-1, 100)),
    # Sampling defaults (a request may set its own).
    Flag(("-s", "--seed"), _int), Flag(("--temp", "--temperature"), _float),
    *(Flag((f"--{name}",), _float) for name in (
        "top-k", "top-p", "min-p", "top-nsigma", "xtc-probability", "xtc-threshold",
        "typical", "repeat-penalty", "presence-penalty", "frequency-penalty",
        "dry-multiplier", "dry-base", "dynatemp-range", "dynatemp-exp", "mirostat-lr",
        "mirostat-ent")),
    *(Flag((f"--{name}",), _TOKENS) for name in (
        "repeat-last-n", "dry-allowed-length", "dry-penalty-last-n")),
    Flag(("--mirostat",), _int_range(0, 2)),
    Flag(("--samplers",), _pattern(_SAMPLER_NAMES, "sampler names joined by ';'")),
    Flag(("--sampling-seq", "--sampler-seq"), _pattern(_SAMPLER_LETTERS, "sampler letters")),
    Flag(("--ignore-eos",)),
    # Chat handling of the model's own template.
    Flag(("--jinja",)), Flag(("--no-jinja",)),
    Flag(("--reasoning-format",), _choice("none", "deepseek", "deepseek-legacy", "auto")),
    Flag(("--reasoning-budget",), _TOKENS),
)

LLAMA_CPP_PYTHON_API_FLAGS = _flags(
    *(Flag((f"--{name}",), _THREADS) for name in ("n_threads", "n_threads_batch")),
    *(Flag((f"--{name}",), _BATCH) for name in ("n_batch", "n_ubatch")),
    *(Flag((f"--{name}",), _TOKENS) for name in ("yarn_orig_ctx", "last_n_tokens_size")),
    Flag(("--seed",), _int), Flag(("--split_mode",), _int_range(0, 2)),
    Flag(("--main_gpu",), _int_range(0, 256)), Flag(("--rope_scaling_type",), _int_range(-1, 3)),
    *(Flag((f"--{name}",), _int_range(0, 64)) for name in ("type_k", "type_v")),
    *(Flag((f"--{name}",), _float) for name in (
        "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor",
        "yarn_beta_fast", "yarn_beta_slow")),
    *(Flag((f"--{name}",), _bool) for name in (
        "use_mmap", "use_mlock", "offload_kqv", "flash_attn", "embedding", "logits_all",
        "mul_mat_q", "numa")),
    # The worker wrapper's own (workers/llama_cpp_server.py).
    Flag(("--pooling",), _choice("none", "mean", "cls", "last", "rank")),
    Flag(("--no_extra_bufts",)),
)


# Flags that a model spec's own keys set (both harnesses' spellings).
SPEC_KEYS = {
    **dict.fromkeys(("-c", "--ctx-size", "--n_ctx"), "n_ctx"),
    **dict.fromkeys(("--n_gpu_layers",), "n_gpu_layers"),
    **dict.fromkeys(("-ts", "--tensor-split", "--tensor_split"), "tensor_split"),
    **dict.fromkeys(("--chat-template", "--chat_format"), "chat_format"),
    **dict.fromkeys(("-np", "--parallel"), "parallel"),
}


def _split(arg: str) -> tuple[str, str | None]:
    """`--flag=value` as (flag, value); `-flag` as (flag, None)."""
    if arg.startswith("--") and "=" in arg:
        flag, _, value = arg.partition("=")
        return flag, value
    return arg, None


def check_api_args(args: Iterable[str], allowed: Mapping[str, Flag],
                   widened: Iterable[str] = (), key: str = "args") -> None:
    """Refuse any `args` element the API may not pass: a flag not on `allowed` (nor on the
    operator's `widened` list), a value of the wrong type, a stray value. A ConfigError
    naming the element (`args[3]`)."""
    extra = frozenset(widened)
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        where = f"{key}[{i}]"
        flag, inline = _split(arg)
        if not flag.startswith("-") or flag in ("-", "--"):
            raise ConfigError(where, f"{_quote(arg)} is not a flag (values follow their flag)")
        spec = allowed.get(flag)
        if spec is None and flag in extra:
            # The operator's own additions: any value, inline or as the next element.
            if inline is None and i + 1 < len(items) and not items[i + 1].startswith("-"):
                i += 1
            i += 1
            continue
        if spec is None and flag in SPEC_KEYS:
            raise ConfigError(where, f"{flag} is the model's `{SPEC_KEYS[flag]}` key: set "
                              "that instead")
        if spec is None:
            raise ConfigError(where, f"{_quote(flag)} may not be set through the API (only "
                              "performance and sampling flags may: docs/security.md); the "
                              "operator can set it in the config")
        if spec.value is None:
            if inline is not None:
                raise ConfigError(where, f"{flag} takes no value")
            i += 1
            continue
        value = inline
        if value is None:
            if i + 1 >= len(items):
                raise ConfigError(where, f"{flag} needs a value")
            i += 1
            value = items[i]
        problem = spec.value(value)
        if problem is not None:  # named where the value is
            raise ConfigError(f"{key}[{i}]", f"{flag} {_quote(value)}: {problem}")
        i += 1


def _quote(text: str, limit: int = 60) -> str:
    """A client's text in a message: repr'd (no control characters) and cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
