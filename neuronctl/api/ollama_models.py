"""What Ollama's API says about models, and `/api/pull`: `/api/version`, `/api/tags`,
`/api/ps` and `/api/show` from the registry, the router's listing and each model's GGUF
header (read in the bounded child, kept per version of the files), the names a request
may use, and a pull as `POST /models/load` would load (the same checks). The pure pieces
(`details`, `model_info`, `pull_target`, ...) come first; ollama.py serves the answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__, errors
from ..config import ModelSpec, effective
from ..errors import BadRequest, NeuronError
from ..models import files as modelfiles
from ..models import gguf
from ..models.headers import read_bounded
from ..states import WorkerState
from ..supervisor.lifecycle import ModelLifecycle
from ..supervisor.registry import ModelRegistry
from . import ollama_convert as convert
from .auth import check_scope, principal
from .v1 import Router

log = logging.getLogger(__name__)

# How often a pull in progress reports.
PULL_REPORT_S = 0.5
# Headers read for /api/tags and /api/show, by file version; bounded.
HEADERS_KEPT = 64
# `expires_at` of a model with no idle time: Ollama's own "forever" is that far too.
FOREVER_S = 100 * 365 * 86400

CheckLoad = Callable[[web.Request, dict[str, Any]], ModelSpec]


# The version /api/version reports: clients gate features on it (Open WebUI asks for
# 0.1.x at least; the `ollama` client does not look). A recent Ollama's, so none refuses.
OLLAMA_VERSION = "0.12.0"

def parameter_size(count: int | None) -> str:
    """As Ollama writes it: "268.10M", "7.6B"."""
    if not count:
        return ""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.0f}K" if count >= 1000 else str(count)


def details(header: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ollama's `details` from a GGUF header's `as_json()` (empty fields without one)."""
    header = header or {}
    family = header.get("architecture") or ""
    file_type = header.get("file_type")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(header.get("parameter_count")),
        "quantization_level": gguf.FILE_TYPES.get(file_type, "") if isinstance(file_type, int)
        else "",
    }


def model_info(header: Mapping[str, Any] | None) -> dict[str, Any]:
    """`/api/show`'s model_info: the GGUF keys the header reader keeps, by their names."""
    if not header:
        return {}
    arch = header.get("architecture")
    info: dict[str, Any] = {"general.architecture": arch,
                            "general.parameter_count": header.get("parameter_count"),
                            "general.file_type": header.get("file_type")}
    if arch:
        for key, gguf_key in (("block_count", "block_count"),
                              ("context_length", "context_length"),
                              ("embedding_length", "embedding_length"),
                              ("head_count", "attention.head_count"),
                              ("head_count_kv", "attention.head_count_kv"),
                              ("key_length", "attention.key_length"),
                              ("value_length", "attention.value_length")):
            info[f"{arch}.{gguf_key}"] = header.get(key)
    return {k: v for k, v in info.items() if v is not None}


def digest(identity: str) -> str:
    """A stable sha256 for a model's listing. Not its file's: hashing gigabytes per
    `/api/tags` is not affordable; it changes when the file (path, size, mtime) does."""
    return hashlib.sha256(identity.encode()).hexdigest()


def pull_target(name: str) -> dict[str, Any]:
    """What `/api/pull` of `name` loads, as a `POST /models/load` body: a catalogue id,
    or `hf.co/ORG/REPO[:QUANT]`, a Hugging Face GGUF as Ollama names it."""
    if name.startswith(("hf.co/", "huggingface.co/")):
        repo, _, quant = name.split("/", 1)[1].partition(":")
        if repo.count("/") != 1:
            raise BadRequest(f"{name[:200]!r}: expected hf.co/ORG/REPO or "
                             "hf.co/ORG/REPO:QUANT")
        target: dict[str, Any] = {"model_id": name, "repo": repo}
        if quant and quant != "latest":
            target["quant"] = quant
        else:
            target["model_id"] = "hf.co/" + repo
        return target
    return {"model_id": name}


class OllamaModels:
    """The models as Ollama's API shows them. `router`: its `servable()` is what
    /api/tags lists; `check_load`: the checks of a client's load (app.checked_spec)."""

    def __init__(self, registry: ModelRegistry, router: Router, check_load: CheckLoad
                 ) -> None:
        self.registry = registry
        self.router = router
        self.check_load = check_load
        self._headers: dict[tuple[Any, ...], dict[str, Any] | None] = {}

    def known(self) -> set[str]:
        return {m.model_id for m in self.registry.models()} | set(self.registry.catalogue)

    def model_id(self, body: dict[str, Any], key: str = "model") -> tuple[str, str]:
        """(the node's id, the name the client used) of the model a request names."""
        name = convert.model_field(body, key)
        return convert.model_id_for(name, self.known()), name

    def spec(self, model_id: str) -> ModelSpec | None:
        model = self.registry.get(model_id)
        return model.spec if model is not None else self.registry.catalogue.get(model_id)

    def n_ctx(self, spec: ModelSpec | None) -> int | None:
        if spec is None:
            return None
        value = effective(spec, self.registry.config.harness_config(spec.harness), "n_ctx")
        return value if isinstance(value, int) else None

    def _parts(self, model_id: str) -> tuple[Path, ...]:
        model = self.registry.get(model_id)
        spec = self.spec(model_id)
        if spec is None:
            return ()
        resolved = model.resolved if model is not None else None
        try:
            return modelfiles.run_spec(spec, resolved, needs_file=False)[2]
        except NeuronError:
            return ()

    async def _header(self, parts: tuple[Path, ...]) -> dict[str, Any] | None:
        """The GGUF header of `parts` (as_json), read in the bounded child once per
        version of the files; None when there is no file yet or it cannot be read."""
        if not parts:
            return None
        try:
            key = tuple((str(p), (st := os.stat(p)).st_size, st.st_mtime_ns) for p in parts)
        except OSError:
            return None
        if key not in self._headers:
            try:
                header: dict[str, Any] | None = (await read_bounded(parts)).as_json()
            except Exception as exc:  # BadHeader, CannotEstimate: the listing goes on
                log.info("ollama api: cannot read the header of %s: %s", parts[0], exc)
                header = None
            while len(self._headers) >= HEADERS_KEPT:
                del self._headers[next(iter(self._headers))]
            self._headers[key] = header
        return self._headers[key]

    async def _describe(self, model_id: str) -> dict[str, Any]:
        """What /api/tags, /api/ps and /api/show share about a model."""
        parts = self._parts(model_id)
        header = await self._header(parts)
        size, mtime = 0, 0.0
        for part in parts:
            try:
                st = os.stat(part)
            except OSError:
                continue
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
        name = convert.ollama_name(model_id)
        identity = "|".join([model_id, *(f"{p}:{size}:{mtime}" for p in parts)])
        return {"name": name, "model": name, "modified_at": convert.timestamp(mtime),
                "size": size, "digest": digest(identity),
                "details": details(header), "_header": header}

    @staticmethod
    def _public(entry: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entry.items() if not k.startswith("_")}

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_VERSION,
                                  "neuronctl": __version__})

    async def tags(self, request: web.Request) -> web.Response:
        """Every model a request may name: what /v1/models lists."""
        key = principal(request)  # a key sees the models its scope holds, no others
        entries = [self._public(await self._describe(model_id))
                   for model_id in self.router.servable() if key.may_use(model_id)]
        return web.json_response({"models": entries})

    async def ps(self, request: web.Request) -> web.Response:
        now = time.time()
        entries = []
        key = principal(request)
        for listed in self.registry.listing():
            if listed["status"] != "loaded" or not key.may_use(listed["id"]):
                continue
            entry = self._public(await self._describe(listed["id"]))
            vram = (listed.get("vram_used_mb") or 0) * 1024 * 1024
            until = listed.get("idle_until")
            entries.append({
                **entry,
                "size": (listed.get("rss_bytes") or 0) + vram,
                "size_vram": vram,
                "expires_at": convert.timestamp(until if until is not None
                                                else now + FOREVER_S),
                "context_length": listed.get("n_ctx") or 0,
            })
        return web.json_response({"models": entries})

    async def show(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        model_id, name = self.model_id(body)
        spec = self.spec(model_id)
        if spec is None or not principal(request).may_use(model_id):
            raise errors.ModelNotFound(f"model '{name}' not found")
        described = await self._describe(model_id)
        header = described["_header"]
        n_ctx = self.n_ctx(spec)
        parameters = [f"num_ctx {n_ctx}"] if n_ctx else []
        capabilities = ["completion"]
        if spec.harness == "llama-server":  # its Jinja chat templates take tools
            capabilities.append("tools")
        source = spec.path or spec.repo or spec.model_id
        return web.json_response({
            "license": "",
            "modelfile": f"# served by neuronctl ({spec.harness})\nFROM {source}\n",
            "parameters": "\n".join(parameters),
            "template": spec.chat_format or "",  # the GGUF's own template otherwise
            "details": described["details"],
            "model_info": model_info(header),
            "capabilities": capabilities,
            "modified_at": described["modified_at"],
        })

    # --- pull ------------------------------------------------------------------------------

    async def pull(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """A catalogue id, or `hf.co/ORG/REPO:QUANT`, loaded as `POST /models/load` would
        (the same checks: remote loads, docs/security.md), with Ollama's progress lines."""
        name = convert.model_field(body)
        stream = body.get("stream", True)
        if stream is None:
            stream = True
        if not isinstance(stream, bool):
            raise errors.BadRequest("stream: expected a boolean")
        target = pull_target(convert.model_id_for(name, self.known()))
        model_id = target["model_id"]
        check_scope(request, model_id)
        if len(target) == 1 and self.spec(model_id) is None:
            raise errors.ModelNotFound(
                f"pull model manifest: {name!r} is not in this node's catalogue; add it to "
                "[[models]] in the node's config, or pull hf.co/ORG/REPO:QUANT")
        spec = self.check_load(request, target)  # RemoteLoadRefused, InvalidSpec, ...
        loading = asyncio.create_task(self.registry.load(spec, by_client=True),
                                      name=f"ollama pull {model_id}")
        if not stream:
            await asyncio.shield(loading)  # a LoadError answers with its status
            return web.json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": convert.NDJSON})
        await response.prepare(request)
        try:
            await response.write(convert.ndjson({"status": "pulling manifest"}))
            async for progress in self._pull_lines(loading, model_id):
                await response.write(convert.ndjson(progress))
            await response.write_eof()
        except ConnectionError:
            pass  # the load goes on, as POST /models/load's does
        return response

    async def _pull_lines(self, loading: asyncio.Task[ModelLifecycle], model_id: str
                          ) -> AsyncIterator[dict[str, Any]]:
        """Ollama's pull lines while the load runs: a download's bytes, then loading, then
        success (or an error line)."""
        said_loading = False
        last: tuple[int, int | None] | None = None
        while not loading.done():
            await asyncio.wait({loading}, timeout=PULL_REPORT_S)
            model = self.registry.get(model_id)
            progress = model.download if model is not None else None
            if progress is not None and model is not None \
                    and model.state is WorkerState.DOWNLOADING:
                now = (progress.done_bytes, progress.total_bytes)
                if now != last:
                    last = now
                    blob = "sha256:" + digest(f"{model_id}:{progress.file}")
                    yield {"status": f"pulling {blob[7:19]}", "digest": blob,
                           "total": progress.total_bytes or 0,
                           "completed": progress.done_bytes}
            elif not said_loading:
                said_loading = True
                yield {"status": "loading model"}
        try:
            loading.result()
        except NeuronError as exc:
            yield exc.control_body()
            return
        yield {"status": "verifying sha256 digest"}
        yield {"status": "success"}


