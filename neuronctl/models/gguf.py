"""What the VRAM estimate needs from a GGUF header, read without trusting the header.

A GGUF header is counts and lengths followed by what they count, so a crafted file of a few
hundred bytes can claim billions of tensors, keys, array items or layers. Every count and
length is checked against the bytes left in the file before anything is allocated or looped
over, and only the few values the estimate uses are kept. The reading itself runs in a
short-lived child process under memory, CPU and wall-clock limits (headers.py runs it): a header
that still gets past the checks costs that child, never the supervisor or its load lock.

The child is this file run by path (`python -I -S gguf.py FILE...`), so it imports
nothing of neuronctl and nothing heavy: no asyncio, json, dataclasses, gguf or numpy. The layout
is GGUF versions 2 and 3 as gguf's GGUFReader and llama.cpp's gguf.cpp read it.
"""

from __future__ import annotations

import io
import os
import struct
import sys

TYPE_CHECKING = False  # typing is not imported: the child starts without it
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_LAYERS = 1 << 16  # far past any model; also caps the per-layer arrays kept
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 1 << 16
_INT64_MAX = (1 << 63) - 1
_WINDOW = 1 << 20  # bytes read from the file at a time

# Child limits (headers.read_bounded): an honest header, tokenizer included, reads in well under a
# second and a few MiB.
TIMEOUT_S = 20.0
CPU_S = 10
MEMORY_BYTES = 256 << 20
_OUTPUT_LIMIT = 1 << 20
_EXIT_REFUSED = 2  # the answer on stdout says why
_EXIT_MEMORY = 3

# GGUF value types: scalar sizes, and struct codes of the integer ones.
_STRING, _ARRAY = 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
_MIN_VALUE_BYTES = 1
_MIN_KV_BYTES = 8 + 4 + _MIN_VALUE_BYTES  # key length, value type, the smallest value
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset

# ggml type -> (elements per block, bytes per block): gguf's GGML_QUANT_SIZES
# (tests/models/test_gguf.py checks the two agree).
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}

# Keys whose values the estimate reads, by the suffix after `{architecture}`.
_ARCH_KEY = b"general.architecture"
_ALIGNMENT_KEY = b"general.alignment"
# What `neuronctl show` says besides the estimate: the quantization llama.cpp wrote, and
# whether a chat template is there (its text is skipped, never kept: it can be megabytes).
_FILE_TYPE_KEY = b"general.file_type"
# Its values, llama.cpp's LLAMA_FTYPE_*: the quantization the file was made with, by the
# names llama.cpp's files and Ollama's API use (`neuronctl show`, /api/tags).
FILE_TYPES: Mapping[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4",
}
_CHAT_TEMPLATE_KEY = b"tokenizer.chat_template"
_POOLING_SUFFIX = b".pooling_type"  # set by embedding models (bert, nomic-bert, ...)
_SUFFIXES = {
    b".block_count": "block_count",
    b".context_length": "context_length",
    b".embedding_length": "embedding_length",
    b".attention.head_count": "head_count",
    b".attention.head_count_kv": "head_count_kv",
    b".attention.key_length": "key_length",
    b".attention.value_length": "value_length",
    # Layers that attend to a window of this many tokens (Gemma 3): a restored prompt cache
    # reuses nothing unless llama-server keeps them at full size (--swa-full).
    b".attention.sliding_window": "sliding_window",
}
_PER_LAYER = (b".attention.head_count", b".attention.head_count_kv")


class BadHeader(ValueError):
    """The file's header cannot be trusted (it lies about its sizes, is cut short, or is no
    GGUF at all): the model must not load."""


class CannotEstimate(Exception):
    """The header could not be sized, harmlessly (a ggml type newer than this reader, the
    reader could not be started): the load goes on without an estimate."""


class Header:
    """What the estimate needs from a model's header(s); None where the file is silent."""

    __slots__ = ("architecture", "block_count", "chat_template", "context_length",
                 "embedding_length", "file_type", "head_count", "head_count_kv", "key_length",
                 "parameter_count", "pooling_type", "sliding_window", "tensor_count",
                 "value_length", "weights_bytes")

    def __init__(
        self,
        weights_bytes: int,
        tensor_count: int,
        architecture: str | None = None,
        block_count: int | None = None,
        context_length: int | None = None,
        embedding_length: int | None = None,
        head_count: int | list[int] | None = None,
        head_count_kv: int | list[int] | None = None,
        key_length: int | None = None,
        value_length: int | None = None,
        sliding_window: int | None = None,
        parameter_count: int | None = None,
        file_type: int | None = None,
        chat_template: bool | None = None,
        pooling_type: int | None = None,
    ) -> None:
        self.weights_bytes = weights_bytes  # every tensor of every part
        self.tensor_count = tensor_count
        self.architecture = architecture
        self.block_count = block_count
        self.context_length = context_length
        self.embedding_length = embedding_length
        self.head_count = head_count  # one number, or one per layer
        self.head_count_kv = head_count_kv
        self.key_length = key_length
        self.value_length = value_length
        self.sliding_window = sliding_window
        self.parameter_count = parameter_count  # elements of every tensor
        self.file_type = file_type  # llama.cpp's LLAMA_FTYPE_*: the quantization
        self.chat_template = chat_template  # whether tokenizer.chat_template is there
        self.pooling_type = pooling_type  # an embedding model's pooling, when it has one

    def as_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: object) -> Header:
        """From the child's answer; raises ValueError on anything but what `as_json` gives."""
        if not isinstance(data, dict) or set(data) != set(cls.__slots__):
            raise ValueError(f"not a header: {data!r:.200}")
        for name, value in data.items():
            ok = value is None or _is_int(value) or (name == "architecture"
                                                     and isinstance(value, str))
            if name == "chat_template":
                ok = value is None or isinstance(value, bool)
            if name in ("head_count", "head_count_kv") and isinstance(value, list):
                ok = all(_is_int(v) for v in value)
            if not ok or (name in ("weights_bytes", "tensor_count") and value is None):
                raise ValueError(f"not a header: {name} = {value!r:.200}")
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(raw: bytes) -> str:
    """A name from the file, safe for a one-line message."""
    text = raw[:80].decode("utf-8", "replace")
    return repr(text + ("..." if len(raw) > 80 else ""))


class _Cursor:
    """Reads one file forward, refusing any length that runs past its end."""

    def __init__(self, fh: io.FileIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self.pos = 0
        self._buf = b""
        self._at = 0  # the file offset of _buf[0]
        self.order = "<"
        self._set_structs()

    def _set_structs(self) -> None:
        self.u32 = struct.Struct(self.order + "I")
        self.u64 = struct.Struct(self.order + "Q")

    def swap(self) -> None:
        self.order = ">"
        self._set_structs()

    def left(self) -> int:
        return self.size - self.pos

    def _take(self, n: int, what: str) -> int:
        """Consume `n` bytes; their offset in `_buf`."""
        if n > self.size - self.pos:
            raise BadHeader(f"{what} at offset {self.pos} runs past the end of the "
                            f"{self.size}-byte file")
        off = self.pos - self._at
        if off < 0 or off + n > len(self._buf):
            self._fh.seek(self.pos)
            self._buf = self._fh.read(max(n, _WINDOW)) or b""
            self._at, off = self.pos, 0
            if len(self._buf) < n:
                raise BadHeader(f"the file shrank while being read ({what})")
        self.pos += n
        return off

    def read(self, n: int, what: str) -> bytes:
        off = self._take(n, what)
        return self._buf[off:off + n]

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        off = self._take(fmt.size, what)
        value: int = fmt.unpack_from(self._buf, off)[0]
        return value

    def ints(self, count: int, code: str, what: str) -> list[int]:
        fmt = struct.Struct(f"{self.order}{count}{code}")
        off = self._take(fmt.size, what)
        return list(fmt.unpack_from(self._buf, off))

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise BadHeader(f"{what} of {n} bytes at offset {self.pos} runs past the end of "
                            f"the {self.size}-byte file")
        self.pos += n

    def string_length(self, what: str) -> int:
        n = self.unpack(self.u64, what)
        if n > self.size - self.pos:
            raise BadHeader(f"{what}: a string of {n} bytes cannot fit in the "
                            f"{self.size - self.pos} bytes left of a {self.size}-byte file")
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings, lengths checked one by one (a tokenizer's vocabulary)."""
        u64, size = self.u64, self.size
        for _ in range(count):
            off = self._take(8, what)
            (n,) = u64.unpack_from(self._buf, off)
            if n > size - self.pos:
                raise BadHeader(f"{what}: a string of {n} bytes cannot fit in the "
                                f"{size - self.pos} bytes left of a {size}-byte file")
            self.pos += n


class _Part:
    """One file's share: its tensors and the values kept from its keys."""

    def __init__(self) -> None:
        self.weights_bytes = 0
        self.tensor_count = 0
        self.elements = 0
        self.values: dict[bytes, int | str | list[int]] = {}


def _read_value(cur: _Cursor, vtype: int, key: bytes, keep: bool) -> int | str | list[int] | None:
    what = f"the value of {_shown(key)}"
    if vtype in _SCALAR_BYTES:
        if keep and vtype in _INT_CODES:
            return cur.unpack(struct.Struct(cur.order + _INT_CODES[vtype]), what)
        cur.skip(_SCALAR_BYTES[vtype], what)
        return None
    if vtype == _STRING:
        n = cur.string_length(what)
        if keep and key == _ARCH_KEY and n <= 256:
            return cur.read(n, what).decode("utf-8", "replace")
        cur.skip(n, what)
        return 1 if keep and key == _CHAT_TEMPLATE_KEY else None  # there; its text unread
    if vtype != _ARRAY:
        raise BadHeader(f"{_shown(key)} has an unknown value type {vtype}")
    itype = cur.unpack(cur.u32, what)
    count = cur.unpack(cur.u64, what)
    if itype == _ARRAY:
        raise BadHeader(f"{_shown(key)} is an array of arrays, which GGUF readers refuse")
    if itype != _STRING and itype not in _SCALAR_BYTES:
        raise BadHeader(f"{_shown(key)} is an array of unknown value type {itype}")
    item = 8 if itype == _STRING else _SCALAR_BYTES[itype]
    if count * item > cur.left():
        raise BadHeader(f"{_shown(key)}: an array of {count} items cannot fit in the "
                        f"{cur.left()} bytes left of a {cur.size}-byte file")
    if itype == _STRING:
        cur.skip_strings(count, what)
        return None
    if keep and itype in _INT_CODES and key.endswith(_PER_LAYER):
        kept = min(count, MAX_LAYERS)
        values = cur.ints(kept, _INT_CODES[itype], what)
        cur.skip((count - kept) * item, what)
        return values
    cur.skip(count * item, what)
    return None


def _wanted(key: bytes) -> bool:
    return key in (_ARCH_KEY, _ALIGNMENT_KEY, _FILE_TYPE_KEY, _CHAT_TEMPLATE_KEY) \
        or key.endswith((*_SUFFIXES, _POOLING_SUFFIX))


def read_part(path: str) -> _Part:
    """One GGUF file's header, every size checked; raises BadHeader or CannotEstimate."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        cur = _Cursor(fh, size)
        magic = cur.read(min(4, size), "the magic")
        if magic != MAGIC:
            # Never the bytes read: the path is a client's, the file may be a secret.
            raise BadHeader("not a GGUF file (no GGUF magic)")
        if size < 24:
            raise BadHeader(f"a {size}-byte file is too short for a GGUF header")
        version = cur.unpack(cur.u32, "the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine
            cur.swap()
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in VERSIONS:
            raise BadHeader(f"GGUF version {version} is not supported (only 2 and 3)")
        tensor_count = cur.unpack(cur.u64, "the tensor count")
        kv_count = cur.unpack(cur.u64, "the kv count")
        if kv_count * _MIN_KV_BYTES > cur.left():
            raise BadHeader(f"kv count {kv_count} cannot fit in a {size}-byte file")
        if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_BYTES > cur.left():
            raise BadHeader(f"tensor count {tensor_count} cannot fit in a {size}-byte file")
        part = _Part()
        part.tensor_count = tensor_count
        for index in range(kv_count):
            n = cur.string_length(f"key {index}")
            if n > MAX_KEY_BYTES:
                raise BadHeader(f"key {index} is {n} bytes long (at most {MAX_KEY_BYTES})")
            key = cur.read(n, f"key {index}")
            vtype = cur.unpack(cur.u32, f"the value type of {_shown(key)}")
            keep = _wanted(key)
            value = _read_value(cur, vtype, key, keep)
            if keep:
                if key in part.values:
                    raise BadHeader(f"{_shown(key)} appears twice")
                if value is not None:
                    part.values[key] = value
        alignment = part.values.get(_ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise BadHeader(f"general.alignment {alignment} is not a power of two")
        end, last = 0, ""  # the furthest any tensor's data reaches, and whose it is
        for index in range(tensor_count):
            n = cur.string_length(f"the name of tensor {index}")
            if n > MAX_NAME_BYTES:
                raise BadHeader(f"the name of tensor {index} is {n} bytes long")
            name = _shown(cur.read(n, f"the name of tensor {index}"))
            n_dims = cur.unpack(cur.u32, f"the dimensions of tensor {name}")
            if n_dims > MAX_DIMS:
                raise BadHeader(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = [cur.unpack(cur.u64, f"the dimensions of tensor {name}")
                    for _ in range(n_dims)]
            ggml_type = cur.unpack(cur.u32, f"the type of tensor {name}")
            offset = cur.unpack(cur.u64, f"the offset of tensor {name}")
            elements = 1
            for dim in dims:
                elements *= dim
            if elements > _INT64_MAX or any(dim > _INT64_MAX for dim in dims):
                shape = " x ".join(map(str, dims))
                raise BadHeader(f"tensor {name}: dims {shape} overflow ({elements} elements)")
            if ggml_type not in GGML_TYPES:
                raise CannotEstimate(f"tensor {name} has ggml type {ggml_type}, which this "
                                     "reader does not know")
            block, type_bytes = GGML_TYPES[ggml_type]
            if dims and dims[0] % block:
                raise BadHeader(f"tensor {name}: its first dimension {dims[0]} is not a "
                                f"multiple of its type's block of {block}")
            n_bytes = elements * type_bytes // block
            part.weights_bytes += n_bytes
            part.elements += elements
            if offset + n_bytes > end:
                end, last = offset + n_bytes, name
        data_start = -(-cur.pos // alignment) * alignment
        if end and data_start + end > size:
            raise BadHeader(f"the data of tensor {last} ends at byte {data_start + end}, past "
                            f"the end of the {size}-byte file")
        return part


def read_model(paths: Sequence[str | os.PathLike[str]]) -> Header:
    """The header of a model, all parts of a split one: the first part's keys, every part's
    tensors. Raises BadHeader or CannotEstimate, naming the part when there are several."""
    parts: list[_Part] = []
    for index, path in enumerate(paths, 1):
        try:
            parts.append(read_part(os.fspath(path)))
        except OSError as exc:
            raise BadHeader(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from exc
        except (BadHeader, CannotEstimate) as exc:
            if len(paths) == 1:
                raise
            name = os.path.basename(os.fspath(path))
            raise type(exc)(f"part {index} of {len(paths)} ({name}): {exc}") from exc
    if not parts:
        raise CannotEstimate("no model file to read")
    values = parts[0].values
    arch = values.get(_ARCH_KEY)
    arch = arch if isinstance(arch, str) else None
    found: dict[str, int | str | list[int]] = {}
    if arch is not None:
        for suffix, name in _SUFFIXES.items():
            value = values.get(arch.encode() + suffix)
            if value is not None:
                found[name] = value
    tensors = sum(p.tensor_count for p in parts)

    def number(name: str) -> int | None:
        value = found.get(name)
        return value if isinstance(value, int) else None

    layers = number("block_count")
    if layers is not None and layers > min(tensors, MAX_LAYERS):
        raise BadHeader(f"block_count {layers} is implausible for a model of {tensors} tensors")

    def per_layer(name: str) -> int | list[int] | None:
        value = found.get(name)
        if isinstance(value, list):
            return value[:layers] if layers is not None else value
        return number(name)

    file_type = values.get(_FILE_TYPE_KEY)
    pooling = values.get(arch.encode() + _POOLING_SUFFIX) if arch is not None else None
    return Header(
        sum(p.weights_bytes for p in parts), tensors, arch, layers, number("context_length"),
        number("embedding_length"), per_layer("head_count"), per_layer("head_count_kv"),
        number("key_length"), number("value_length"), number("sliding_window"),
        parameter_count=sum(p.elements for p in parts),
        file_type=file_type if isinstance(file_type, int) else None,
        chat_template=_CHAT_TEMPLATE_KEY in values,
        pooling_type=pooling if isinstance(pooling, int) else None)


def _quote(text: str) -> str:
    try:
        from _json import encode_basestring_ascii  # C, without json's import of re
    except ImportError:  # another Python
        import json

        return json.dumps(text)
    quoted: str = encode_basestring_ascii(text)
    return quoted


def _to_json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, list):
        return "[" + ",".join(_to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_quote(k)}:{_to_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _limit(kind: int, value: int) -> None:
    import resource

    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, hard if hard != resource.RLIM_INFINITY else value + 1))


def main(argv: list[str]) -> int:
    """The child: `gguf.py [--memory BYTES] [--cpu SECONDS] [--] FILE...`; one JSON
    object on stdout."""
    import resource

    options = {"--memory": MEMORY_BYTES, "--cpu": CPU_S}
    while argv and argv[0] in options:
        options[argv[0]] = int(argv[1])
        argv = argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    # Before the first byte of the file: soft limits raise MemoryError and SIGXCPU.
    _limit(resource.RLIMIT_AS, options["--memory"])
    _limit(resource.RLIMIT_CPU, options["--cpu"])  # SIGXCPU would dump a core: none
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        answer: dict[str, object] = {"header": read_model(argv).as_json()}
        code = 0
    except BadHeader as exc:
        answer, code = {"refused": str(exc)}, _EXIT_REFUSED
    except CannotEstimate as exc:
        answer, code = {"unknown": str(exc)}, _EXIT_REFUSED
    except MemoryError:
        os._exit(_EXIT_MEMORY)  # printing may need the memory there is not
    sys.stdout.write(_to_json(answer) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
