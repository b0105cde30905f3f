"""Write a tiny but real llama-architecture GGUF (~0.5 MB) that llama.cpp loads and runs.

No machine here can download weights, so the real-worker tests and benchmarks make their
own: 2 layers, 64-wide embeddings, 4 heads, a 260-token byte vocabulary, random weights.
It answers completions with random text, which is all a supervisor test needs.

`write_llama_gguf` is the same recipe at any size, for what must be measured on a GPU
(tests/test_cuda.py, bench/gpu.py): speed and memory do not depend on the weights' values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_FF = 128
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>", b" "] + [f"<0x{i:02X}>".encode() for i in range(256)]
    scores = [0.0] * len(tokens)
    # llama token types: 2 unknown, 3 control, 1 normal, 6 byte
    types = [2, 3, 3, 1] + [6] * 256
    return tokens, scores, types


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    return write_llama_gguf(path, seed=seed)


def write_llama_gguf(
    path: Path,
    *,
    n_layers: int = N_LAYERS,
    n_embd: int = N_EMBD,
    n_head: int = N_HEAD,
    n_ff: int = N_FF,
    context_length: int = 256,
    f16: bool = False,
    seed: int = 0,
    name: str = "neuron-tiny-test",
) -> Path:
    """A llama GGUF of the given shape with random weights (f16 halves the file)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    dtype = np.float16 if f16 else np.float32

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))

    # Norms stay f32, as llama.cpp's converters write them.
    tensor("token_embd.weight", n_vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    tensor("output.weight", n_vocab, n_embd)
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for part in ("q", "k", "v", "output"):
            tensor(f"blk.{i}.attn_{part}.weight", n_embd, n_embd)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_gguf(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
