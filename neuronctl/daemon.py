"""`neuronctl start`: activation first, then the API, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import threading
import types
from pathlib import Path

from .activation import ActivationResult, load_default_models
from .config import NeuronConfig
from .harness import Harness
from .models import ModelRecord
from .registry import ModelRegistry
from .reload import Reloader
from .statefile import StateFile
from .states import LIVE_STATES
from .systemd import ActivationStatus, Notifier, summary, watchdog

log = logging.getLogger("neuronctl")

# In-flight requests get this long to finish once the listener has closed.
SHUTDOWN_GRACE_S = 5.0


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind, but do not listen yet: until activation ends, connections are refused, and a
    port already in use is reported before any model is loaded."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _import_api_quietly() -> types.ModuleType:
    # Lowest CPU priority for this thread only: on a small host it must not slow the worker
    # that is loading at the same time.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    return importlib.import_module("neuronctl.api")


async def serve(
    config: NeuronConfig,
    harnesses: dict[str, Harness],
    sock: socket.socket,
    state: StateFile | None = None,
    config_path: Path | None = None,
) -> int:
    """Activate, then serve the API on `sock` until SIGTERM or SIGINT; the exit status.

    SIGHUP (and POST /reload) re-read `config_path` once the node is up."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = ModelRegistry(config, harnesses, state=state)
    notifier = Notifier()
    reloader = Reloader(registry, config_path, notifier)
    serving = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, reloader, serving)
    pinger = asyncio.create_task(watchdog(notifier))
    # The API's imports (aiohttp's server side, ~0.2 s) happen in a thread while the first
    # worker loads in its own process, instead of after activation, on the way to listening.
    api_module = loop.run_in_executor(None, _import_api_quietly)
    started_at = loop.time()
    # /metrics counts the default models' loads too, but prometheus-client and the API are
    # imported off the path to the first worker; their load times wait here meanwhile.
    early_loads: list[tuple[ModelRecord, float]] = []
    registry.ready_observers.append(lambda record, s: early_loads.append((record, s)))
    try:
        results = await _activate(registry, config, notifier, stop)
        if results is None:
            log.info("stop requested during activation; stopped every worker")
            return 0
        api = await api_module
        registry.ready_observers.clear()
        metrics = api.Metrics(registry, started_at)
        for record, seconds in early_loads:
            metrics.observe_load(record, seconds)
        app = api.create_app(registry, started_at, reloader, metrics)
        runner = api.web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        await api.web.SockSite(runner, sock).start()
        # READY=1 only now: systemd's "started" then means the API answers.
        notifier.send("READY=1", f"STATUS={summary(results)}")
        log.info("listening on http://%s:%d (%s)", config.host, config.port, summary(results))
        serving.set()

        await stop.wait()
        running = sum(r.state in LIVE_STATES for r in registry.models())
        log.info("stopping: closing the listener and stopping %d workers", running)
        notifier.send("STOPPING=1", f"STATUS=stopping {running} workers")
        # Stop accepting, answer waiting loads, give requests in flight up to
        # SHUTDOWN_GRACE_S (the workers still serve them), then stop every worker at once.
        registry.cancel_loads()
        await runner.cleanup()
        await registry.shutdown()
        log.info("stopped")
        return 0
    finally:
        pinger.cancel()
        notifier.close()


def _on_sighup(reloader: Reloader, serving: asyncio.Event) -> None:
    if not serving.is_set():
        # Activation is loading the config's models already; a reload now would race it.
        log.warning("SIGHUP during activation ignored; reload once the node is up")
        return
    reloader.reload_in_background()


async def _activate(
    registry: ModelRegistry, config: NeuronConfig, notifier: Notifier, stop: asyncio.Event
) -> list[ActivationResult] | None:
    """Load the default models; None if a stop signal came first (workers already stopped)."""
    observer = ActivationStatus(notifier, registry.load_progress)
    activation = asyncio.create_task(
        load_default_models(registry, config.default_models, observer)
    )
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({activation, stopping}, return_when=asyncio.FIRST_COMPLETED)
    await observer.finish()
    if activation.done():
        stopping.cancel()
        return activation.result()
    notifier.send("STOPPING=1", "STATUS=stopping during activation")
    activation.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await activation
    await registry.shutdown()
    return None
