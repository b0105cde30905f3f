"""Shared test helpers: bounded polling, ports, process checks, the console script and its
environment, and the registry factory's type."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from neuronctl.config import NeuronConfig
from neuronctl.harness import Harness
from neuronctl.registry import ModelRegistry

T = TypeVar("T")

NEURONCTL = Path(sys.executable).parent / "neuronctl"

# Checked without importing: llama_cpp opens files at import that it never closes.
llama_required = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="needs llama-cpp-python[server] (the `server` extra)",
)


class MakeRegistry(Protocol):
    """The `make_registry` fixture: a registry it shuts down when the test is over."""

    def __call__(
        self,
        config: NeuronConfig | None = None,
        harnesses: Mapping[str, Harness] | None = None,
        **kwargs: Any,
    ) -> ModelRegistry: ...


def poll_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


async def poll_until_async(condition: Callable[[], T], timeout: float = 10.0,
                           interval: float = 0.02) -> T:
    """`poll_until` for a test running in the event loop: it yields between looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        await asyncio.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without NEURON_* overrides or anything that widens Rich's
    console, plus `extra`: what systemd would give the CLI."""
    drop = {"COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_") and k not in drop}
    return {**env, **extra}


def fast_restarts(config: NeuronConfig, **overrides: Any) -> NeuronConfig:
    values: dict[str, Any] = {
        "restart_delay_s": 0.2, "restart_delay_max_s": 1.0, "restart_window_s": 60.0,
        **overrides,
    }
    return dataclasses.replace(config, **values)
