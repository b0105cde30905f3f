"""`neuronctl start`: activation first, then the API, until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from .activation import load_default_models
from .config import NeuronConfig
from .harness import Harness
from .registry import ModelRegistry

log = logging.getLogger("neuronctl")

# In-flight requests get this long to finish once the listener has closed.
SHUTDOWN_GRACE_S = 5.0


def setup_logging(level: str = "INFO") -> None:
    # The journal stamps every line itself; a terminal or a file needs our own time stamp.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


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


async def serve(config: NeuronConfig, harnesses: dict[str, Harness], sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = ModelRegistry(config, harnesses)
    started_at = loop.time()

    activation = asyncio.create_task(load_default_models(registry, config.default_models))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({activation, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not activation.done():
        log.info("stop requested during activation; stopping workers")
        activation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await activation
        await registry.shutdown()
        return 0
    stopping.cancel()
    results = activation.result()

    # Imported here: nothing before the listener needs aiohttp's server side.
    from aiohttp import web

    from .api import create_app

    runner = web.AppRunner(
        create_app(registry, started_at), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    loaded = sum(r.ok for r in results)
    log.info(
        "listening on http://%s:%d (%d/%d default models loaded)",
        config.host, config.port, loaded, len(results),
    )

    await stop.wait()
    running = sum(r.worker is not None for r in registry.models())
    log.info("stopping: closing the listener and stopping %d workers", running)
    for site in list(runner.sites):
        await site.stop()
    await registry.shutdown()
    await runner.cleanup()
    log.info("stopped")
    return 0
