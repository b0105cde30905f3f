"""`neuronctl start`: validate everything that can be checked up front, then run the daemon.

Parsed with argparse rather than typer: this is systemd's ExecStart, where start-up time is
activation time, and typer's argument handling alone costs about 0.1 s (bench/activation.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from ..errors import EX_CONFIG, fail
from . import eventloop
from .logsetup import FORMATS, setup_logging

LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuronctl start",
        description="Load the default models one by one, then serve the API until SIGTERM.",
    )
    env_config = os.environ.get("NEURON_CONFIG")
    parser.add_argument("--config", "-c", type=Path,
                        default=Path(env_config) if env_config else None,
                        help=f"config file (default: $NEURON_CONFIG, else {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--port", type=int, default=None, help="listen on this port instead")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, type=str.lower,
                        help="daemon log level (default: info)")
    parser.add_argument("--log-format", default="text", choices=FORMATS,
                        help="text: plain lines (no time stamp under the journal); "
                        "json: one object per line (default: text)")
    return parser


def run(argv: Sequence[str]) -> int:
    """Run the daemon in the foreground; the process exit status."""
    # Until the daemon's own handlers are installed (its first step), a SIGHUP (a reload
    # sent too early) must not kill it with the default action. No worker exists yet, so
    # SIGTERM's default (exit) is still right here.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.port is not None:
            if not 1 <= args.port <= 65535:
                fail(f"--port must be between 1 and 65535, got {args.port}", EX_CONFIG)
            config = dataclasses.replace(config, port=args.port)
        from ..supervisor.harness import build_harnesses

        harnesses = build_harnesses(config)
        run_loop = eventloop.runner(config.event_loop)
    except eventloop.LoopUnavailable as exc:
        fail(f"config error: {args.config or DEFAULT_CONFIG_PATH}: event_loop: {exc}",
             EX_CONFIG)
    except ConfigError as exc:
        if exc.source is None:
            exc.source = str(args.config or DEFAULT_CONFIG_PATH)
        fail(f"config error: {exc}", EX_CONFIG)
    # Before the directory checks: what they warn about belongs in the journal.
    setup_logging(args.log_level.upper(), args.log_format)
    try:
        config.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # Not fatal either: each worker's output then goes to the journal (worker.py).
        log.warning("log_dir: cannot create %s: %s; model output goes to the journal",
                    config.log_dir, exc.strerror or exc)

    from ..supervisor.lock import AlreadyRunning, SupervisorLock
    from ..supervisor.statefile import StateFile
    from . import daemon

    lock: SupervisorLock | None = None
    state: StateFile | None = None
    if _make_state_dir(config.state_dir):
        lock = SupervisorLock(config.state_dir)
        try:
            lock.acquire()
        except AlreadyRunning as exc:
            sys.stderr.write(f"neuronctl: {exc}\n")
            return 1
        # The daemon's first step stops workers a crashed predecessor left behind.
        state = StateFile(config.state_dir)
    try:
        try:
            sock = daemon.bind_listener(config.host, config.port)
        except OSError as exc:
            where = f"{config.host}:{config.port}"
            sys.stderr.write(f"neuronctl: cannot listen on {where}: {exc.strerror}\n")
            return 1
        path = args.config or DEFAULT_CONFIG_PATH
        return run_loop(daemon.serve(config, harnesses, sock, state, path))
    finally:
        if lock is not None:
            lock.release()


def _make_state_dir(state_dir: Path) -> bool:
    """Whether `state_dir` exists or was made. One that cannot be (a path under a file, a
    read-only mount) is not fatal: models still serve, without what the directory gives."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("state_dir: cannot create %s: %s; running without workers.json and "
                    "neuron.lock: a worker left running by a crash of this supervisor will "
                    "not be found, and a second neuronctl start will not be refused",
                    state_dir, exc.strerror or exc)
        return False
    return True
