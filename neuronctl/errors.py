"""Every error the node answers a client with: its HTTP status, its OpenAI `type` and `code`.

One class per thing that can go wrong, so a status is decided once, where the error is
raised, and both answer shapes are rendered from the same object:

* the control API (`/models/...`): `{"error": "message", "type": ..., "code": ..., ...}`,
  wire-compatible with the original service, whose clients read only `error`;
* the OpenAI-compatible router (`/v1/...`):
  `{"error": {"message", "type", "param", "code"}}`, which OpenAI's client libraries parse.

The message is always one line an operator can act on; longer context (a worker's last log
lines) travels in `detail`, never in the message.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

# Characters of a client's value (a path, say) an error message or a journal line quotes:
# a message is one line, and what a client sends must not come back, or pile up, at size.
MAX_QUOTED = 200


def clip(value: object, limit: int = MAX_QUOTED) -> str:
    """`value` as a message quotes it: its start and its end (a path's file name) when it
    is longer than `limit` characters, with how long it was."""
    text = str(value)
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[:limit - tail]}…[{len(text)} characters]…{text[-tail:]}"


# OpenAI's error types: a client's mistake (a bad key and an unknown model included, as
# OpenAI itself answers them) or the server's; its client libraries branch on the status.
INVALID_REQUEST = "invalid_request_error"
SERVER = "server_error"

# The exit status of a command refused for its config (sysexits.h's EX_CONFIG): the daemon's
# and the CLI's.
EX_CONFIG = 78


def fail(message: str, code: int = 1) -> NoReturn:
    """End a command with one line on stderr and exit status `code`: the CLI's refusals, the
    fleet commands' and `neuronctl start`'s before the daemon runs. A plain write, not rich:
    one line however narrow the terminal (or the journal) is."""
    sys.stderr.write(f"neuronctl: {message}\n")
    raise SystemExit(code)


class NeuronError(Exception):
    """Base of every error a client may see. Subclasses set the three class attributes."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = SERVER
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.detail = detail  # more lines of context, shown where there is room for them
        self.headers: dict[str, str] = dict(headers or {})

    def control_body(self, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "type": self.type, "code": self.code}
        if self.detail:
            body["detail"] = self.detail
        return {**body, **extra}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- the client's request ----------------------------------------------------------------

class BadRequest(NeuronError):
    status, type, code = 400, INVALID_REQUEST, "invalid_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class EmbeddingsNotEnabled(BadRequest):
    """An embeddings request to a model whose worker was started without embeddings."""

    code = "embeddings_not_enabled"


class InvalidValue(BadRequest):
    code = "invalid_value"


class InvalidSpec(BadRequest):
    """A model spec (a config entry or a load request) that cannot be run as written."""

    code = "invalid_spec"


class UnknownHarness(InvalidSpec):
    code = "unknown_harness"

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown harness: {name}", param="harness")
        self.name = name


class InvalidConfig(BadRequest):
    """A reload whose new config does not validate: nothing was changed."""

    code = "invalid_config"


class Unauthorized(NeuronError):
    status, type, code = 401, INVALID_REQUEST, "invalid_api_key"


class ArgNotAllowed(InvalidSpec):
    """`args` of an API load that only the operator may set (apiargs.py)."""

    code = "arg_not_allowed"


class Forbidden(NeuronError):
    """What this client may not do here, whatever its key (docs/security.md)."""

    status, type, code = 403, INVALID_REQUEST, "forbidden"


class CrossSiteRefused(Forbidden):
    """A browser request from another site's page (CSRF), refused on every route but
    /health."""

    code = "cross_site_request"


class RemoteLoadRefused(Forbidden):
    """A load by path, args or Hugging Face repo from a client that is not on this host,
    with `allow_remote_loads` off."""

    code = "remote_load_refused"


class RoleForbidden(Forbidden):
    """A valid key without the role the route needs (api/roles.py)."""

    code = "insufficient_role"


class ModelOutOfScope(Forbidden):
    """An inference key naming a model outside its `models` globs."""

    code = "model_not_in_scope"


class MisdirectedRequest(NeuronError):
    """A `Host` this node does not answer to: a DNS-rebinding page's, most likely."""

    status, type, code = 421, INVALID_REQUEST, "unknown_host"


class UnsupportedMediaType(NeuronError):
    """A POST body that is not declared JSON: a cross-site form or `text/plain` fetch is
    sent without a CORS preflight, a JSON one is not."""

    status, type, code = 415, INVALID_REQUEST, "unsupported_media_type"


class NotFound(NeuronError):
    status, type, code = 404, INVALID_REQUEST, "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ApiModelsRefused(NeuronError):
    """A load request for a model outside the catalogue while `max_api_models` of them are
    loaded (or the node allows none): unload one, or ask for a catalogue model."""

    status, type, code = 409, INVALID_REQUEST, "api_model_limit"


class Conflict(NeuronError):
    """The request contradicts what the model is doing (loaded with other settings, being
    unloaded); refused rather than queued, so the client knows at once."""

    status, type, code = 409, INVALID_REQUEST, "conflict"


class MethodNotAllowed(NeuronError):
    status, type, code = 405, INVALID_REQUEST, "method_not_allowed"


class PayloadTooLarge(NeuronError):
    status, type, code = 413, INVALID_REQUEST, "request_too_large"


class QueueFull(NeuronError):
    """The model's queue is at `max_queue`: back off (Retry-After) and try again."""

    status, type, code = 429, INVALID_REQUEST, "queue_full"


class KeyRateLimited(NeuronError):
    """A key past its `rpm` or `max_concurrent`, refused before it takes a queue slot."""

    status, type, code = 429, INVALID_REQUEST, "key_rate_limited"


class KeyConcurrencyLimited(KeyRateLimited):
    code = "key_concurrency_limited"


class KeyStreamsLimited(KeyRateLimited):
    """A key (not an admin's) holding its share of a kind of long-lived stream."""

    code = "key_too_many_streams"


class QueueBytesFull(QueueFull):
    """The node's queues together hold `max_queued_bytes` of request bodies."""

    code = "queue_bytes_full"


# --- loading a model ---------------------------------------------------------------------

class LoadError(NeuronError):
    """A model could not be loaded. `exit_code` is the worker's, when it exited."""

    code = "load_failed"

    def __init__(self, message: str, exit_code: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.exit_code = exit_code


class ModelFileError(LoadError):
    """The model file is not there (or not what the spec says): the request must change."""

    status, type, code = 400, INVALID_REQUEST, "model_file_not_found"


class DownloadError(LoadError):
    """Hugging Face could not be reached or broke off: may work when tried again."""

    status, code = 502, "download_failed"


class NotEnoughDisk(LoadError):
    """The Hugging Face cache's filesystem cannot hold a download (refused before it
    began, or it ran out of space meanwhile and its partial files were removed)."""

    status, code = 507, "insufficient_storage"


class NotEnoughVram(LoadError):
    status, code = 503, "insufficient_vram"

    short_mb: int | None = None  # how much more would fit it, when the estimate says


class NotEnoughRam(LoadError):
    """A model on the CPU needs more memory than the host has available."""

    status, code = 503, "insufficient_ram"


class ContextTooLong(LoadError):
    """A load request's `n_ctx` is above the context its model was trained for."""

    status, type, code = 400, INVALID_REQUEST, "n_ctx_too_large"


class NoSuchGpu(NotEnoughVram):
    """The spec names a device this host does not have."""

    code = "no_such_gpu"


class NoRoom(LoadError):
    """`max_loaded_models` (or VRAM) is taken by models that are pinned, or stayed busy for
    the whole `eviction_wait_s`: nothing could be unloaded without cutting a request."""

    status, code = 503, "no_room"


class HarnessUnavailable(LoadError):
    """The harness's program is not installed on this node."""

    status, code = 503, "harness_unavailable"


class SpawnFailed(LoadError):
    """The worker process could not be started at all (exec failed, log unwritable)."""

    status, code = 500, "worker_spawn_failed"


class WorkerExited(LoadError):
    """The worker started and exited before it answered: its log says why."""

    status, code = 502, "worker_exited"


class WorkerTimeout(LoadError):
    status, code = 504, "worker_timeout"


class LoadCancelled(LoadError):
    """The model was unloaded, or the node began to stop, while the load was under way."""

    status, code = 503, "load_cancelled"


class InternalError(LoadError):
    """A bug: logged with its traceback; the client gets one line."""

    status, code = 500, "internal_error"


# --- serving requests through /v1 --------------------------------------------------------

class ModelNotReady(NeuronError):
    status, code = 503, "model_not_ready"


class ModelFailed(NeuronError):
    status, code = 503, "model_failed"


class QueueTimeout(NeuronError):
    """Waited `queue_timeout_s` for a slot (or for the model to be ready) and got none."""

    status, code = 503, "queue_timeout"


class WorkerUnavailable(NeuronError):
    status, code = 502, "worker_unavailable"


# --- connections and streams ------------------------------------------------------------

class TooManyConnections(NeuronError):
    """`max_connections` are open and none waits for its request head to make room; the
    connection guard answers it before any request is read (api/guard.py)."""

    status, code = 503, "too_many_connections"


class TooManyStreams(NeuronError):
    """`GET /models/events` is at its bound of open streams (each holds a connection)."""

    status, code = 503, "too_many_streams"
