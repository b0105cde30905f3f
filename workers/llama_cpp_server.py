"""A llama-cpp-python worker: llama-cpp-python's OpenAI server for exactly one model.

The supervisor runs this file by path with the interpreter named in
`[harness.llama-cpp-python] python`, passing the server's own command-line flags. It runs
the server as `python -m llama_cpp.server` would, with two differences the supervisor
relies on:

* `interrupt_requests` is always off: the stock default cancels the stream in progress
  whenever another request arrives, so with 8 concurrent streaming clients 7 were cut off.
  The supervisor's router queues requests per model instead.
* `GET /health` answers 200 without taking the model's lock. The server's own routes all
  wait for that lock, which a long generation holds for minutes; a liveness probe must be
  answered by a busy worker and fail only for a hung one. The app (and so this route)
  exists only once the model has loaded, so its first 200 also means ready.

* An answer that fills the context ends with `finish_reason: "length"`. Stock
  llama-cpp-python (0.3.x) checks `max_tokens` only after a token that completes a UTF-8
  character, so a token that starts one at the context's last position is followed by one
  more evaluation past the end: `llama_decode returned 1` ("failed to find a memory slot"),
  a 500, or a stream broken off after its 200 (and the cache left in a state that failed
  the next requests too). `_end_at_full_context` ends such an answer where the context
  ends, as its own `max_tokens` check would have.

* A streamed answer's last chunk (the one with its `finish_reason`) carries `usage`
  (`prompt_tokens`, `completion_tokens`, `total_tokens`), as its non-streamed answer does.
  Stock llama-cpp-python (0.3.x) ignores `stream_options` and streams no usage at all; the
  supervisor's Ollama and Anthropic answers and its per-key token counters need the
  counts, and counting the chunks cannot give them (a chunk may hold several tokens, the
  last holds none, and the prompt's tokens are never streamed). `_usage_in_streams`.

And two flags the stock server lacks:

* `--pooling none|mean|cls|last|rank` (llama.cpp's pooling type, as llama-server's
  `--pooling`). Without it an embedding model whose GGUF does not name a pooling type (most
  chat models) answers `/v1/embeddings` with one vector per token instead of one per input.
* `--no_extra_bufts` (llama.cpp's `use_extra_bufts = false`, as llama-server's
  `--no-repack`): no repacked or AMX weight buffers. On CPUs with AMX, llama.cpp's AMX
  matrix multiply crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the first answer of
  Gemma 3 270M Q4_K_M; the supervisor passes this flag on such CPUs.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any, cast

# llama_cpp.server lets these environment variables override --host/--port/--config_file.
# The supervisor chose the port and the loopback address; an inherited HOST or PORT must
# not move the worker somewhere it will never be found (or expose it beyond 127.0.0.1).
_OVERRIDING_ENV = ("HOST", "PORT", "CONFIG_FILE")


def main() -> None:
    for name in _OVERRIDING_ENV:
        os.environ.pop(name, None)
    try:
        import llama_cpp
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
        from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings
    except ImportError as exc:
        print(
            f"neuron worker: cannot import llama_cpp.server with {sys.executable}: {exc}\n"
            "install it there with: pip install 'llama-cpp-python[server]'",
            file=sys.stderr,
        )
        sys.exit(3)
    print(
        f"neuron worker: llama-cpp-python {llama_cpp.__version__}, python {sys.version.split()[0]}",
        file=sys.stderr,
        flush=True,
    )
    import argparse

    parser = argparse.ArgumentParser(prog="llama_cpp_server.py",
                                     description="llama-cpp-python's server, for neuronctl")
    add_args_from_model(parser, Settings)
    pooling_types = {name: getattr(llama_cpp, f"LLAMA_POOLING_TYPE_{name.upper()}")
                     for name in ("none", "mean", "cls", "last", "rank")}
    parser.add_argument("--pooling", choices=sorted(pooling_types), default=None,
                        help="pooling of /v1/embeddings vectors (default: the model's own)")
    parser.add_argument("--no_extra_bufts", action="store_true",
                        help="no repacked or AMX weight buffers (llama-server's --no-repack)")
    args = parser.parse_args()
    if args.pooling is not None:
        _default_pooling(llama_cpp.Llama, pooling_types[args.pooling])
    if args.no_extra_bufts:
        _no_extra_buffers(llama_cpp.llama_cpp)  # the module llama.py calls it from
    _end_at_full_context(llama_cpp.Llama)
    _usage_in_streams(llama_cpp.Llama, llama_cpp)  # after: it counts the end it may add
    try:
        # Typed upstream as returning the class it is given; it returns an instance.
        server_settings = cast(ServerSettings, parse_model_from_args(ServerSettings, args))
        model_settings = cast(ModelSettings, parse_model_from_args(ModelSettings, args))
    except Exception as exc:  # pydantic's validation error: one message, then usage
        print(f"neuron worker: {exc}", file=sys.stderr)
        sys.exit(2)
    server_settings.interrupt_requests = False
    app = create_app(server_settings=server_settings, model_settings=[model_settings])

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # The supervisor probes /health every few seconds: 8,640 access-log lines a day per
    # model that say nothing. Every other request is still logged.
    logging.getLogger("uvicorn.access").addFilter(NoHealthProbes())
    uvicorn.run(app, host=server_settings.host, port=server_settings.port,
                ssl_keyfile=server_settings.ssl_keyfile,
                ssl_certfile=server_settings.ssl_certfile)


class NoHealthProbes(logging.Filter):
    """Drops uvicorn's access-log line of a GET /health (its args: client, method, path,
    HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and len(args) >= 3 and args[1] == "GET"
                    and args[2] == "/health")


def _default_pooling(llama: type, pooling_type: int) -> None:
    """The server builds its Llama without a pooling_type argument (as of 0.3.x): give
    the constructor one, so the model is loaded with it."""
    init = llama.__init__  # type: ignore[misc]

    def with_pooling(self: object, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("pooling_type", pooling_type)
        init(self, *args, **kwargs)

    llama.__init__ = with_pooling  # type: ignore[misc]


def _end_at_full_context(llama: type) -> None:
    """Never evaluate a token past the context: where `generate` would, it yields the
    end-of-generation token instead (which `_create_completion` checks first, before its
    UTF-8 hold-back), and the answer it ends is marked "length", not "stop".

    The server runs one completion at a time per model, so the mark lives on the model."""
    generate = getattr(llama, "generate")  # noqa: B009 (typed as a bare `type` here)
    create = getattr(llama, "_create_completion")  # noqa: B009

    def bounded_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        inner = generate(self, tokens, *args, **kwargs)
        try:
            token = next(inner)
            while True:
                sent = yield token
                # Resumed, the inner generator evaluates the token it just yielded at
                # position n_tokens: there must be room for it.
                if self.n_tokens >= self._n_ctx and self.token_eos() >= 0:
                    self._neuron_context_full = True
                    yield self.token_eos()
                    return
                token = inner.send(sent)
        except StopIteration:
            return
        finally:
            inner.close()

    def marked_create(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._neuron_context_full = False
        for chunk in create(self, *args, **kwargs):
            if self._neuron_context_full:
                for choice in chunk.get("choices", ()):
                    if choice.get("finish_reason") == "stop":
                        choice["finish_reason"] = "length"
            yield chunk

    setattr(llama, "generate", bounded_generate)  # noqa: B010
    setattr(llama, "_create_completion", marked_create)  # noqa: B010


def _usage_in_streams(llama: type, llama_cpp: types.ModuleType) -> None:
    """Count what `generate` gives `_create_completion`, and put the counts on a stream's
    last chunk, completion and chat alike (the chat handlers rebuild each chunk from the
    completion's, so the chat stream gets them again on its own last chunk).

    `_create_completion` appends every token `generate` yields to its completion, except an
    end-of-generation token, at which it stops: its non-streamed `usage` is that count and
    the prompt's length, so these are the same numbers. One completion at a time per model
    (the server holds the model's lock), so the counts live on the model."""
    generate = getattr(llama, "generate")  # noqa: B009
    create = getattr(llama, "_create_completion")  # noqa: B009
    chat = getattr(llama, "create_chat_completion")  # noqa: B009
    vocab_is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
    token_is_eog = getattr(llama_cpp, "llama_token_is_eog", None)  # before the vocab API

    def is_eog(self: Any, token: int) -> bool:
        if vocab_is_eog is not None:
            return bool(vocab_is_eog(self._model.vocab, token))
        if token_is_eog is not None:
            return bool(token_is_eog(self._model.model, token))
        return bool(token == self.token_eos())

    def counted_generate(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        self._neuron_usage = {"prompt_tokens": len(tokens), "completion_tokens": 0}
        inner = generate(self, tokens, *args, **kwargs)
        try:
            token = next(inner)
            while True:
                if not is_eog(self, token):
                    self._neuron_usage["completion_tokens"] += 1
                sent = yield token
                token = inner.send(sent)
        except StopIteration:
            return
        finally:
            inner.close()

    def usage(self: Any) -> dict[str, int] | None:
        counts = getattr(self, "_neuron_usage", None)
        if counts is None:
            return None
        return {**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"]}

    def with_usage(self: Any, chunks: Any) -> Any:
        for chunk in chunks:
            choices = chunk.get("choices") or ()
            if any(c.get("finish_reason") is not None for c in choices) \
                    and "usage" not in chunk and (counts := usage(self)) is not None:
                chunk["usage"] = counts
            yield chunk

    def counted_create(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._neuron_usage = None  # a prompt refused before generating says nothing
        yield from with_usage(self, create(self, *args, **kwargs))

    def counted_chat(self: Any, *args: Any, **kwargs: Any) -> Any:
        answer = chat(self, *args, **kwargs)
        return answer if isinstance(answer, dict) else with_usage(self, answer)

    setattr(llama, "generate", counted_generate)  # noqa: B010
    setattr(llama, "_create_completion", counted_create)  # noqa: B010
    setattr(llama, "create_chat_completion", counted_chat)  # noqa: B010


def _no_extra_buffers(llama_cpp: types.ModuleType) -> None:
    """Llama builds its model parameters from `llama_model_default_params()` and has no
    argument for `use_extra_bufts`: default it off instead."""
    defaults = llama_cpp.llama_model_default_params

    def without_extra_buffers() -> object:
        params = defaults()
        params.use_extra_bufts = False
        return params

    setattr(llama_cpp, "llama_model_default_params", without_extra_buffers)  # noqa: B010


if __name__ == "__main__":
    main()
