"""What a worker's refusal says, and the one refusal that is the request's, not the
worker's: an embeddings request to a worker started without embeddings (llama-server's 501,
llama-cpp-python's 500), told apart so that `/v1/embeddings` and Ollama's `/api/embed`
answer it as a 400 saying what to set."""

from __future__ import annotations

import json


def worker_error(status: int, body: bytes) -> str:
    """What a worker's refusal says (OpenAI's shape, FastAPI's `detail`, or its text)."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return body[:300].decode("utf-8", "replace").strip() or f"the worker answered {status}"
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:500]
        if isinstance(error, str):
            return error[:500]
        detail = answer.get("detail")
        if detail is not None:
            return json.dumps(detail)[:500]
    return f"the worker answered {status}"


# How each harness's worker is started with embeddings on, as `args` in the node config
# (docs/guide.md, "Embedding models").
EMBEDDING_ARGS = {"llama-cpp-python": '"--embedding", "true"', "llama-server": '"--embeddings"'}


def embeddings_off(status: int, message: str) -> bool:
    """Whether a worker's refusal of an embeddings request says it was started without
    embeddings: llama-server answers 501 ("Start it with `--embeddings`"),
    llama-cpp-python a 500 ("Llama model must be created with embedding=True")."""
    said = message.lower()
    return status == 501 or "embedding=true" in said or "--embedding" in said


def embeddings_hint(name: str, harness: str, said: str) -> str:
    """What to set so the model answers embeddings, for its harness."""
    args = EMBEDDING_ARGS.get(harness)
    how = f"add {args} to its `args`" if args is not None else \
        "start its worker with embeddings on (its `args`)"
    return (f"model '{name}' was not loaded with embeddings enabled: {how} in the node "
            "config (with \"--pooling\", \"mean\" or the model's own pooling, for one "
            f"vector per input) and reload it; the worker said: {said[:200]}")
