"""Reload: re-read the config and bring the running models in line with it.

Default models newly listed are loaded (one at a time, as at start-up), default models no
longer listed are unloaded, changed entries are reloaded (stopped, then started with the new
settings: the model is down meanwhile). A catalogue model (`[[models]]`) that is loaded is
treated the same: changed, it is reloaded; removed from the file, it is unloaded. One that is
not loaded takes its new entry at its next load. Anything else keeps running untouched. A
config that fails validation changes nothing. Settings that only a restart can apply (the
listener, the directories, the API key, the router's body limit) are reported and left as
they are. Each model touched is named with why (`gemma: n_ctx 2048 → 1024, reloaded`), in
the answer and the journal; a dry run says the same and changes nothing.
`[[keys]]` apply from the next request (the API reads the config per request); their
names, never the keys, are reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio import bounded, in_thread
from ..config import (
    ConfigError,
    ModelSpec,
    NeuronConfig,
    load_config,
    same_worker,
    shown_setting,
)
from ..errors import Conflict
from ..sdnotify import Notifier
from ..states import ModelStatus
from .activation import load_default_models
from .harness import Harness, build_harnesses
from .registry import ModelRegistry

log = logging.getLogger(__name__)

RESTART_ONLY = ("host", "port", "node_id", "log_dir", "state_dir", "api_key",
                "max_request_bytes", "header_timeout_s", "body_timeout_s", "max_connections",
                "event_loop")
# Reading the config is a file read, in a thread of its own; one that has not returned in
# this long (a FIFO, a hung network mount) refuses the reload instead of holding it.
READ_TIMEOUT_S = 10.0


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    needs_restart: list[str] = field(default_factory=list)
    # One line per model touched or changed: `gemma: n_ctx 2048 → 1024, reloaded`.
    details: list[str] = field(default_factory=list)
    dry_run: bool = False
    # [[keys]] by name: new, gone, and kept under their name with another key or rights.
    keys_added: list[str] = field(default_factory=list)
    keys_removed: list[str] = field(default_factory=list)
    keys_changed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in (
            ("added", self.added), ("removed", self.removed), ("reloaded", self.reloaded),
        )]
        text = ("would reload config: " if self.dry_run else "reloaded config: ") + \
            ", ".join(parts)
        if self.failed:
            text += f", {len(self.failed)} failed: {', '.join(self.failed)}"
        for what, names in (("added", self.keys_added), ("removed", self.keys_removed),
                            ("changed", self.keys_changed)):
            if names:
                text += f"; keys {what}: {', '.join(names)}"
        if self.needs_restart:
            text += f"; needs a restart to apply: {', '.join(self.needs_restart)}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"status": "reloaded", "summary": self.summary(), **dataclasses.asdict(self)}


class Reloader:
    def __init__(
        self,
        registry: ModelRegistry,
        config_path: Path | None,
        notifier: Notifier | None = None,
        build: Callable[[NeuronConfig], dict[str, Harness]] = build_harnesses,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._read_timeout_s = read_timeout_s
        self.registry = registry
        self.config_path = config_path
        self._notifier = notifier or Notifier({})
        self._build = build
        self._lock = asyncio.Lock()  # SIGHUP and POST /reload never interleave
        self._background: set[asyncio.Future[None]] = set()
        self._read: asyncio.Future[tuple[NeuronConfig, dict[str, Harness]]] | None = None

    def reload_in_background(self) -> None:
        """For SIGHUP: nobody waits for the answer, so a refusal goes to the log."""

        async def reload_logged() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload refused, nothing changed: %s", exc)

        task = asyncio.ensure_future(reload_logged())
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def reload(self, dry_run: bool = False) -> ReloadResult:
        """Raises ConfigError (and changes nothing) when the new config is invalid.
        `dry_run`: what a reload would do, nothing done."""
        async with self._lock:
            new, harnesses = await self._read_config()
            if dry_run:
                return self._plan(self.registry.config, new)
            # systemd shows `reloading` until READY=1 (MONOTONIC_USEC: sd_notify(3)).
            self._notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                                "STATUS=reloading the config")
            try:
                result = await self._apply(new, harnesses)
            finally:
                loaded = sum(r.status is ModelStatus.LOADED for r in self.registry.models())
                self._notifier.send("READY=1", f"STATUS={loaded} models loaded (after reload)")
            log.info("%s", result.summary())
            for line in result.details:
                log.info("reload: %s", line)
            return result

    def _plan(self, old: NeuronConfig, new: NeuronConfig) -> ReloadResult:
        """What reloading from `old` to `new` does, model by model; nothing done."""
        result = ReloadResult(dry_run=True)
        result.needs_restart = [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
        keys_before = {k.name: k for k in old.keys}
        keys_after = {k.name: k for k in new.keys}
        result.keys_added = [n for n in keys_after if n not in keys_before]
        result.keys_removed = [n for n in keys_before if n not in keys_after]
        result.keys_changed = [n for n in keys_after
                               if n in keys_before and keys_after[n] != keys_before[n]]
        new = dataclasses.replace(new, **{k: getattr(old, k) for k in RESTART_ONLY})
        before = {s.model_id: s for s in old.default_models}
        after = {s.model_id: s for s in new.default_models}
        old_catalogue, new_catalogue = old.catalogue(), new.catalogue()
        for model_id in before:
            if model_id not in after:
                result.removed.append(model_id)
                result.details.append(f"{model_id}: no longer a default model, unloaded")
        for model_id, spec in after.items():
            if model_id not in before:
                result.added.append(model_id)
                result.details.append(f"{model_id}: a new default model, loaded")
            elif _changed(old, before[model_id], new, spec):
                result.reloaded.append(model_id)
                result.details.append(
                    f"{model_id}: {change(old, before[model_id], new, spec)}, reloaded")
        # Catalogue models that run: what a reload does to a default model, it does to them.
        for model_id, spec in old_catalogue.items():
            if model_id in before or model_id in after:
                continue
            model = self.registry.get(model_id)
            running = model is not None and not model.stopping and \
                self.registry.in_catalogue(model.spec)
            entry = new_catalogue.get(model_id)
            if entry is None:
                if running:
                    result.removed.append(model_id)
                    result.details.append(f"{model_id}: removed from the config, unloaded")
            elif _changed(old, spec, new, entry):
                what = change(old, spec, new, entry)
                if running:
                    result.reloaded.append(model_id)
                    result.details.append(f"{model_id}: {what}, reloaded")
                else:
                    result.details.append(f"{model_id}: {what}, applies at its next load")
        for model_id in new_catalogue:
            if model_id not in old_catalogue and model_id not in after:
                result.details.append(f"{model_id}: new in the catalogue, loadable by id")
        return result

    async def _apply(self, new: NeuronConfig, harnesses: dict[str, Harness]) -> ReloadResult:
        old = self.registry.config
        result = self._plan(old, new)
        result.dry_run = False
        new = dataclasses.replace(new, **{k: getattr(old, k) for k in RESTART_ONLY})
        # `gemma: n_ctx 2048 → 1024, reloaded` → the reason its events carry.
        why = {line.split(": ", 1)[0]: line.split(": ", 1)[1].rsplit(", ", 1)[0]
               for line in result.details}
        self.registry.reconfigure(new, harnesses)
        for model_id in result.removed + result.reloaded:
            if self.registry.get(model_id) is not None:
                try:
                    await self.registry.unload(model_id, f"config changed: {why[model_id]}")
                except Conflict as exc:  # already being unloaded by someone else
                    result.failed[model_id] = str(exc)
        todo = set(result.added + result.reloaded)
        catalogue = new.catalogue()
        specs = [s for s in new.default_models if s.model_id in todo]
        specs += [catalogue[m] for m in result.reloaded if not new.is_default(m)]
        for outcome in await load_default_models(self.registry, specs):
            if outcome.error is not None:
                result.failed[outcome.model_id] = outcome.error
        return result

    async def _read_config(self) -> tuple[NeuronConfig, dict[str, Harness]]:
        """The new config and its harnesses, read off the event loop (a blocking file must
        not freeze the API); a read still stuck from an earlier reload refuses this one."""
        if self._read is not None and not self._read.done():
            raise ConfigError("", f"the config file {self.config_path} is still being read "
                              "by an earlier reload (a FIFO, or a hung mount?)")

        def read() -> tuple[NeuronConfig, dict[str, Harness]]:
            config = load_config(self.config_path)
            return config, self._build(config)

        self._read = asyncio.ensure_future(in_thread(read, "read config"))
        # Its outcome may come after this reload gave up on it: retrieved, never "lost".
        self._read.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await bounded(asyncio.shield(self._read), self._read_timeout_s)
        except asyncio.TimeoutError:
            raise ConfigError("", f"reading the config file {self.config_path} did not finish "
                              f"within {self._read_timeout_s:g} s") from None


def change(old: NeuronConfig, a: ModelSpec, new: NeuronConfig, b: ModelSpec) -> str:
    """What differs between two entries of one model: `n_ctx 2048 → 1024; harness
    llama-server settings`."""
    parts = [f"{f.name} {shown_setting(getattr(a, f.name))} → {shown_setting(getattr(b, f.name))}"
             for f in dataclasses.fields(ModelSpec)
             if getattr(a, f.name) != getattr(b, f.name)]
    if old.harness_config(a.harness) != new.harness_config(b.harness):
        parts.append(f"[harness.{b.harness}] changed")
    return "; ".join(parts) or "settings changed"


def _changed(old: NeuronConfig, a: ModelSpec, new: NeuronConfig, b: ModelSpec) -> bool:
    # A changed harness table changes the worker command as surely as a changed entry;
    # `pinned` and `autoload` alone restart nothing (a restart would cut requests).
    return not same_worker(a, b) or old.harness_config(a.harness) != new.harness_config(b.harness)
