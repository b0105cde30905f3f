"""`neuronctl start`'s life in named steps: startup, serve, shutdown.

Signal handlers are installed before anything else (as uvicorn's server does), so a
SIGTERM or SIGHUP that arrives during orphan cleanup or activation is handled, never the
default action that kills the process with its workers still running. Whatever step
fails, shutdown still runs: every worker is stopped and the exit status is 1, with one
line in the journal saying which step failed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib
import logging
import os
import signal
import socket
import threading
import types
from pathlib import Path
from typing import Any

from .. import __version__
from ..aio import in_thread
from ..api.traffic import RouterStats  # no aiohttp: the start path stays light
from ..config import NeuronConfig
from ..identity import is_loopback
from ..notes import ListeningNote, StartingNote, local_url
from ..sdnotify import Notifier
from ..states import LIVE_STATES
from ..supervisor.activation import ActivationResult, load_default_models
from ..supervisor.harness import Harness, unavailable
from ..supervisor.orphans import stop_orphans
from ..supervisor.registry import ModelRegistry
from ..supervisor.reload import Reloader
from ..supervisor.statefile import StateFile
from ..units import plural
from . import eventloop, listener
from .systemd import ActivationStatus, NodeStatus, summary, watchdog

log = logging.getLogger("neuronctl")

# In-flight requests get this long to finish once the listener has closed.
SHUTDOWN_GRACE_S = 5.0


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind, but do not listen yet: until activation ends, connections are refused, and a
    port already in use (by any process, or by another neuronctl still activating) is
    reported before any model is loaded: an OSError whose strerror is one line."""
    return listener.bind(host, port)


def _import_api_quietly() -> types.ModuleType:
    # Lowest CPU priority for this thread only (a thread of its own, which ends with the
    # import): on a small host it must not slow the worker loading at the same time.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return importlib.import_module("neuronctl.api.app")


class Daemon:
    def __init__(
        self,
        config: NeuronConfig,
        harnesses: dict[str, Harness],
        sock: socket.socket,
        state: StateFile | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.sock = sock
        self.state = state
        # The composition root: the router's counters are made here, before anything that
        # reads them (eviction, /models, the idle unloader, /metrics, the dashboard).
        self.stats = RouterStats()
        self.registry = ModelRegistry(config, harnesses, state=state,
                                      activity=self.stats.activity)
        # What `neuronctl status` shows while the API does not answer yet.
        self.starting = StartingNote(config.state_dir) if state is not None else None
        # Where the API answers, for a CLI whose config names a port not applied yet.
        self.listening = ListeningNote(config.state_dir) if state is not None else None
        self.notifier = Notifier()
        self.config_path = config_path
        self.reloader = Reloader(self.registry, config_path, self.notifier)
        self.stop = asyncio.Event()
        self.serving = False
        self.step = "starting"  # named in the one line a failure logs
        self._runner: Any = None  # aiohttp's AppRunner, once the API is up
        self._tasks: list[asyncio.Task[Any]] = []

    async def run(self) -> int:
        """The exit status: 0 after a requested stop, 1 when a step failed."""
        self._install_signals()
        # The one line that says which daemon this is and what it will do.
        log.info("neuronctl %s starting (%s): config %s, %s, %d in the catalogue, "
                 "the API on %s:%d once they are loaded, API key %s", __version__,
                 eventloop.name(),
                 self.config_path or "(none)",
                 plural(len(self.config.default_models), "default model"),
                 len(self.config.models), self.config.host, self.config.port,
                 ("required" + (f", {len(self.config.keys)} named keys"
                                if self.config.keys else ""))
                 if self.config.api_key or self.config.keys else "not set")
        self._check_harnesses()
        exposed = exposure_warning(self.config)
        if exposed is not None:
            log.warning("%s", exposed)
        code = 0
        try:
            if await self._startup():
                await self.stop.wait()  # serve
        except Exception as exc:
            log.error("neuronctl: %s failed: %s", self.step, exc or type(exc).__name__)
            log.debug("traceback of the failure", exc_info=True)
            code = 1
        finally:
            await self._shutdown()
        return code

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        if not self.serving:
            # Activation is loading the config's models already; a reload now would race it.
            log.warning("SIGHUP during %s ignored; reload once the node is up", self.step)
            return
        self.reloader.reload_in_background()

    # --- startup -------------------------------------------------------------------------

    async def _startup(self) -> bool:
        """Up to READY=1; False when a stop signal came first."""
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        listener.raise_fd_limit()  # before any worker starts, so that all see the same
        self._tasks.append(asyncio.create_task(watchdog(self.notifier), name="watchdog"))
        self.step = "cleaning up after a previous supervisor"
        if self.starting is not None:
            self.starting.write(self.step)
        if self.state is not None:
            await asyncio.to_thread(_stop_orphans, self.state, self.config.stop_timeout_s)
        if self.stop.is_set():
            return False
        # The API's imports (aiohttp's server side, ~0.2 s) happen in a thread while the
        # first worker loads in its own process, not after activation.
        api_import = asyncio.ensure_future(in_thread(_import_api_quietly, "import api"))
        # Default models' loads are counted in /metrics, which exists only after activation.
        early = self.registry.events.subscribe()
        self.step = "activation"
        results = await self._activate()
        if results is None:
            log.info("stop requested during activation")
            early.close()
            return False
        self.step = "starting the API"
        api = await api_import
        metrics = api.Metrics(self.registry, self.stats, started_at, since=early)
        app = api.create_app(self.registry, started_at, self.reloader, metrics,
                             stats=self.stats)
        self._runner = api.web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        # What start-up made (modules, config, the app: ~40,000 objects) lives as long as
        # the daemon: kept out of the collector's full passes, which otherwise walk it all
        # (13-18 ms here, a stall of every request in flight: the p99 of a small request).
        gc.collect()
        gc.freeze()
        from ..api import guard  # aiohttp is imported by now

        limits = guard.Limits(
            self.config.header_timeout_s, self.config.body_timeout_s,
            listener.max_connections(self.config.max_connections, listener.fd_limit()))
        log.debug("listener: header_timeout_s %g, body_timeout_s %g, max_connections %d",
                  *dataclasses.astuple(limits))
        await guard.GuardedSockSite(self._runner, self.sock, guard.ConnectionGuard(limits)).start()
        if self.starting is not None:
            self.starting.clear()  # the API answers from here on
        if self.listening is not None:
            self.listening.listening(local_url(self.config.host, self.config.port),
                                     self.config_path)
        # READY=1 only now: systemd's "started" then means the API answers.
        self.notifier.send("READY=1", f"STATUS={summary(results)}")
        self.registry.events.on_event(NodeStatus(self.notifier, self.registry.models))
        if self.config.prefetch:  # after activation, never before it: see models/pulls.py
            queued = self.registry.pulls.prefetch(self.config.catalogue().values())
            log.info("prefetch: %d catalogue model(s) queued for download", len(queued))
        log.info("listening on http://%s:%d (%s)", self.config.host, self.config.port,
                 summary(results))
        self.serving = True
        self.step = "serving"
        return True

    async def _activate(self) -> list[ActivationResult] | None:
        """Load the default models; None if a stop signal came first."""
        note = self.starting.write if self.starting is not None else None
        observer = ActivationStatus(self.notifier, self.registry.load_progress, note)
        activation = asyncio.create_task(
            load_default_models(self.registry, self.config.default_models, observer))
        stopping = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({activation, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await observer.finish()
        if activation.done():
            return activation.result()
        activation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await activation
        return None

    def _check_harnesses(self) -> None:
        """A harness the config asks for but this host cannot run (llama-server not
        installed): said once now, not first discovered by a load. One that runs learns
        now what its first load would (harness.prepare)."""
        wanted: dict[str, list[str]] = {name: [] for name in self.config.harness}
        for spec in (*self.config.default_models, *self.config.models):
            wanted.setdefault(spec.harness, []).append(spec.model_id)
        for name, models in wanted.items():
            harness = self.registry.harnesses.get(name)
            why = unavailable(harness) if harness is not None else None
            if why is not None:
                using = f"; {', '.join(models)} will fail to load" if models else ""
                log.warning("harness %s cannot run here: %s%s", name, why, using)
            elif harness is not None:
                harness.prepare()

    # --- shutdown ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Close the listener, let requests in flight finish (bounded: the workers still
        serve them), then stop every worker at once. Runs after any step, failed or not."""
        self.step = "shutdown"
        for note in (self.starting, self.listening):
            if note is not None:
                note.clear()
        running = sum(m.state in LIVE_STATES for m in self.registry.models())
        log.info("stopping: closing the listener and stopping %d worker%s", running,
                 "" if running == 1 else "s")
        self.notifier.send("STOPPING=1", f"STATUS=stopping {running} workers")
        try:
            self.registry.cancel_loads()  # waiting load requests answer now
            if self._runner is not None:
                await self._runner.cleanup()
            else:
                self.sock.close()
            await self.registry.shutdown()
            log.info("stopped")
        finally:
            for task in self._tasks:
                task.cancel()
            self.notifier.close()
            self._remove_signals()
            listener.release(self.sock)  # the port's claim, held until the workers stopped


def _stop_orphans(state: StateFile, timeout_s: float) -> None:
    """Workers a crashed predecessor left behind hold VRAM the new ones need. Never
    fatal: a state file that is not what we write is set aside by `read`, and one that
    cannot be rewritten (a full or read-only state_dir) only means no orphan records."""
    stop_orphans(state.read(), timeout_s)
    try:
        state.reset()
    except OSError as exc:
        log.warning("cannot reset %s: %s (a worker left running by a crash of this "
                    "supervisor will not be found)", state.path, exc.strerror or exc)


async def serve(
    config: NeuronConfig,
    harnesses: dict[str, Harness],
    sock: socket.socket,
    state: StateFile | None = None,
    config_path: Path | None = None,
) -> int:
    """Activate, then serve the API on `sock` until SIGTERM or SIGINT; the exit status.

    SIGHUP (and POST /reload) re-read `config_path` once the node is up."""
    return await Daemon(config, harnesses, sock, state, config_path).run()


def exposure_warning(config: NeuronConfig) -> str | None:
    """What a node anyone on the network can drive hands them, or None: said at every
    start, since the defaults (every address, no key) are exactly this."""
    if config.api_key is not None or config.keys or is_loopback(config.host):
        return None
    loads = ("load any model file or Hugging Face repo with any performance flags"
             if config.allow_remote_loads else "load catalogue models")
    return (f"the API listens on {config.host}:{config.port} with no api_key: anyone who "
            f"can reach this port can use every model, {loads}, unload models, read their "
            f'logs and reload the config; set api_key, or host = "127.0.0.1" '
            "(docs/security.md)")
