"""One worker subprocess: spawn it, wait until it answers, stop it.

A worker runs in its own session (so one signal reaches its whole process group) and
cannot outlive a supervisor that dies without cleaning up: a parent-death signal, or, for
a llama-server that speaks llama.cpp's router-child protocol (routerchild.py), the end of
its stdin, which only the supervisor holds open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import logfiles
from ..aio import bounded
from ..errors import SpawnFailed, WorkerExited, WorkerTimeout
from . import childproc, portowner, routerchild
from .childproc import ChildProcess
from .harness import WorkerPlan

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 15
_PROBE_TIMEOUT_S = 5.0
# Readiness polling: the interval grows with the time already waited (a hundredth of it),
# so a 20 ms load is noticed within 2 ms, a 1 s one within 10 ms, and however long a load
# takes, its readiness is seen within 50 ms (llama.cpp's router takes its children's word
# at once: a longer tail here would be a load's cost that is only the supervisor's). A poll
# of a port not yet open is one refused connect(), one of a loading llama-server a 503:
# tens to hundreds of microseconds, 20 a second at most.
_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.05
_POLL_FRACTION = 0.01
# A router child says when it is ready (routerchild.py); its /health is asked this often
# all the same, in case its word never comes.
_WORD_FALLBACK_S = 1.0
# A ready router child that has not exited this long after its exit command gets SIGTERM
# as well (see stop). It exits in milliseconds when the command is read.
_COMMAND_GRACE_S = 0.5

# In every worker's environment, so that anything it starts inherits it: how the next
# supervisor proves a process in a recorded group is ours (orphans.py).
TOKEN_ENV = "NEURON_WORKER_TOKEN"

Spawn = Callable[..., Awaitable[ChildProcess]]
OnSpawn = Callable[["Worker"], Awaitable[None]]


def describe_exit(code: int) -> str:
    """How a worker ended, for messages: "exited with code 3", "was killed by SIGKILL"."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGKILL the child when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # resolved here: not safe after fork
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


async def spawn_process(
    command: Sequence[str], env: Mapping[str, str], log_fd: int,
    pipes: tuple[int, int] | None = None,
) -> ChildProcess:
    environment = {**os.environ, **env}
    if pipes is not None:
        # A router child: its stdin and stdout are a routerchild.Channel's pipes, and no
        # preexec_fn (Python then vforks instead of copying the supervisor); what it
        # prints goes to stderr (the log).
        stdin, stdout, stderr, preexec = pipes[0], pipes[1], log_fd, None
    else:
        stdin, stdout, stderr = subprocess.DEVNULL, log_fd, subprocess.STDOUT
        preexec = _pdeathsig_preexec()
    started = childproc.spawn(command, environment, stdin, stdout, stderr, preexec)
    if started is not None:
        return started
    return await asyncio.create_subprocess_exec(  # no pidfds here: asyncio watches it
        *command, stdin=stdin, stdout=stdout, stderr=stderr, env=environment,
        start_new_session=True, preexec_fn=preexec)


async def probe_http(port: int, path: str) -> bool:
    """True when GET http://127.0.0.1:port/path answers 200."""
    return await probe_status(port, path) == 200


async def probe_status(port: int, path: str) -> int | None:
    """The status GET http://127.0.0.1:port/path answers with; None without an answer.

    Plain asyncio streams rather than an HTTP client: activation runs before the API exists
    and this keeps it from waiting on heavier imports.
    """
    try:
        reader, writer = await bounded(
            asyncio.open_connection("127.0.0.1", port), _PROBE_TIMEOUT_S
        )
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        writer.write(request.encode("ascii"))
        status_line = await bounded(reader.readline(), _PROBE_TIMEOUT_S)
        parts = status_line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def fetch_json(port: int, path: str, timeout_s: float,
                     limit: int = 1 << 20) -> object | None:
    """GET http://127.0.0.1:port/path's JSON body, read within `timeout_s` and `limit`
    bytes; None for anything else (an error status, no answer, not JSON). HTTP/1.0: the
    worker closes the connection after the answer, which ends the body."""
    try:
        raw = await bounded(_read_all(port, path, limit), timeout_s)
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"200":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _read_all(port: int, path: str, limit: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                     .encode("ascii"))
        data = bytearray()
        while chunk := await reader.read(1 << 16):
            data += chunk
            if len(data) > limit:
                raise ValueError(f"answer over {limit} bytes")
        return bytes(data)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Worker:
    """One model server subprocess."""

    def __init__(
        self,
        model_id: str,
        plan: WorkerPlan,
        port: int,
        log_path: Path,
        stop_timeout_s: float,
        *,
        log_keep: int = 0,
        on_spawn: OnSpawn | None = None,
        spawn: Spawn = spawn_process,
        probe: Callable[[int, str], Awaitable[bool]] = probe_http,
        status_probe: Callable[[int, str], Awaitable[int | None]] = probe_status,
        owns_port: Callable[[int, int], bool | None] = portowner.owned_by_group,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.plan = plan
        self.port = port
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.log_keep = log_keep
        self._on_spawn = on_spawn
        self._spawn = spawn
        self._probe = probe  # liveness
        self._status_probe = status_probe  # readiness
        self._owns_port = owns_port
        self._clock = clock
        self._proc: ChildProcess | None = None
        self._exited: asyncio.Task[int] | None = None
        # In the worker's environment, inherited by anything it starts: proves, after a
        # supervisor crash, which processes are ours (orphans.stop_orphans).
        self.token = secrets.token_hex(16)
        self.log_problem: str | None = None  # why its log file could not be written
        self._stop_sent: str | None = None  # what neuronctl did to end it, for the log
        # A router child's pipes (routerchild.Channel), and its own word that it is ready
        # (never set for other workers).
        self._channel: routerchild.Channel | None = None
        self._said_ready = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Spawn and wait until ready. On any failure, or if cancelled, the process is
        killed before this returns; failures raise a LoadError saying what the log said."""
        fd = self._open_log()
        try:
            env = {**self.plan.env, TOKEN_ENV: self.token}
            if self.plan.router_child:
                self._channel = channel = routerchild.Channel()
                self._said_ready = channel.ready
                self._proc = await self._spawn(self.plan.command, env, fd,
                                               pipes=channel.child_ends)
            else:
                self._proc = await self._spawn(self.plan.command, env, fd)
        except OSError as exc:
            raise SpawnFailed(
                f"cannot start worker {self.plan.command[0]}: {exc.strerror}") from None
        except (ValueError, subprocess.SubprocessError) as exc:  # a NUL in an argument, say
            raise SpawnFailed(f"cannot start worker {self.plan.command[0]}: {exc}") from None
        finally:
            # At info: what runs on the node, flags included, is in the journal for every
            # load; written once it runs (with its pid), not on the way to it.
            log.info("%s: running %s (%s, port %d, log %s)", self.model_id,
                     shlex.join(self.plan.command),
                     "not started" if self._proc is None else f"pid {self._proc.pid}",
                     self.port, self.log_path)
            if self._proc is None:
                os.close(fd)
            if self._channel is not None:
                if self._proc is None:
                    self._channel.close()
                else:
                    self._channel.spawned()
        # From here on a process exists: whatever fails (the pid line on a full disk, the
        # state file, the wait) kills it before the error goes on, so a model listed as
        # failed never leaves a worker running.
        try:
            self._exited = asyncio.ensure_future(self._proc.wait())
            self._exited.add_done_callback(self._on_exit)
            try:
                if self.log_problem is None:
                    logfiles.write_pid_line(fd, self._proc.pid)
            except OSError as exc:
                self._log_failed(exc)
            finally:
                os.close(fd)  # the child holds its own copy
            if self._on_spawn is not None:
                await self._on_spawn(self)
            await self._wait_ready()
        except BaseException:
            await self.kill()
            raise

    def _open_log(self) -> int:
        """The descriptor the worker writes to: its log file, or, when that cannot be
        written (a full or read-only log_dir), the supervisor's own stderr (the journal),
        so a full disk costs the log, never the model."""
        try:
            return logfiles.open_for_worker(self.log_path, self.plan.command, self.log_keep)
        except OSError as exc:
            self._log_failed(exc)
        return os.dup(2)

    def _log_failed(self, exc: OSError) -> None:
        self.log_problem = (f"cannot write the log {self.log_path}: "
                            f"{exc.strerror or exc}; its output goes to the service's journal")
        log.error("%s: %s", self.model_id, self.log_problem)

    async def _wait_ready(self) -> None:
        assert self._exited is not None
        started = self._clock()
        deadline = started + self.plan.ready_timeout_s
        said_ready = asyncio.ensure_future(self._said_ready.wait())
        try:
            if self.plan.router_child and await self._take_word(said_ready, started, deadline):
                return
            await self._poll_ready(said_ready, started, deadline)
        finally:
            said_ready.cancel()

    async def _take_word(self, said_ready: asyncio.Future[Any], started: float,
                         deadline: float) -> bool:
        """A router child is ready when it says so: no polls while it loads (on a small
        host they take CPU from the load, and a poll in flight delays the answer to the
        one that sees it ready), but one a second in case its word never comes. True once
        it said so, or once its /health did and it holds its port; False when the port is
        not provably its own (then polls find out who holds it). Its word needs no proof:
        llama-server says it only once it listens on its port, and exits when another
        process holds it (it never binds with SO_REUSEPORT: `--reuse-port` is reserved)."""
        assert self._exited is not None
        wakers: set[asyncio.Future[Any]] = {self._exited, said_ready}
        while not said_ready.done() or self._exited.done():
            self._check_start(started, deadline, None)
            done, _ = await asyncio.wait(
                wakers, timeout=min(_WORD_FALLBACK_S, deadline - self._clock()),
                return_when=asyncio.FIRST_COMPLETED)
            if not done and await self._status_probe(self.port, self.plan.probe_path) == 200:
                log.warning("%s: worker pid %s answers %s but did not say it was ready; "
                            "taking the answer's word", self.model_id, self.pid,
                            self.plan.probe_path)
                return self._proves_ours()
        return True

    async def _poll_ready(self, said_ready: asyncio.Future[Any], started: float,
                          deadline: float) -> None:
        assert self._exited is not None
        squatter: str | None = None  # who else answered on our port, if anyone did
        # Whether the listener on our port is the worker's: asked at the first answer of
        # any status (llama-server opens its port before it loads, so the proof is done
        # while the model loads) until it holds. Once ours, the port stays ours while the
        # worker lives: nobody else can bind it.
        proven = False
        while True:
            # A router child's word is its /health turning 200, without asking.
            status = (200 if said_ready.done()
                      else await self._status_probe(self.port, self.plan.probe_path))
            if status is not None and not proven:
                # Once another process was seen on the port, the proof scans every
                # process's sockets: in a thread, off the event loop.
                proven = (self._proves_ours() if squatter is None
                          else await asyncio.to_thread(self._proves_ours))
            if status == 200:
                if proven:
                    return
                if squatter is None:
                    squatter = await asyncio.to_thread(portowner.describe_holder, self.port)
                    log.warning("%s: port %d answered, but from %s, not worker pid %s; "
                                "waiting for the worker itself", self.model_id,
                                self.port, squatter, self.pid)
            self._check_start(started, deadline, squatter)
            now = self._clock()
            delay = min(_POLL_MAX_S, max(_POLL_MIN_S, (now - started) * _POLL_FRACTION))
            # Wake early if the process exits, so a crash is reported at once, or says it
            # is ready (once said, only the polls for the port's proof go on).
            wakers: set[asyncio.Future[Any]] = {self._exited}
            if not said_ready.done():
                wakers.add(said_ready)
            await asyncio.wait(wakers, timeout=min(delay, deadline - now),
                               return_when=asyncio.FIRST_COMPLETED)

    def _check_start(self, started: float, deadline: float, squatter: str | None) -> None:
        """Raise when the starting worker exited (WorkerExited) or ran out of time."""
        assert self._exited is not None
        if self._exited.done():
            code = self._exited.result()
            headline, detail = self.log_excerpt()
            taken = (f" (port {self.port} was taken by {squatter})"
                     if squatter is not None else "")
            raise WorkerExited(
                f"worker {describe_exit(code)} while starting{taken}: {headline}",
                exit_code=code, detail=detail)
        if self._clock() >= deadline:
            headline, detail = self.log_excerpt()
            raise WorkerTimeout(
                f"worker not ready after {self.plan.ready_timeout_s:g} s (killed); "
                f"its log last said: {headline}", detail=detail)

    def _proves_ours(self) -> bool:
        """The listener on our port belongs to the worker's process group (its session:
        a wrapper's children count), not to a process that took the port first. Inline,
        not in a thread: it asks the kernel for listeners only (portowner), a tenth of a
        millisecond, less than a thread's hand-off, and it is on the way to the first
        answer."""
        assert self._proc is not None
        return self._owns_port(self.port, self._proc.pid) is not False

    async def get_json(self, path: str, timeout_s: float) -> object | None:
        """The worker's JSON answer to GET `path`; None when it gives none in time."""
        return await fetch_json(self.port, path, timeout_s)

    async def answers(self, timeout_s: float) -> bool:
        """One liveness probe: does the worker answer its probe within `timeout_s`?"""
        try:
            return await bounded(self._probe(self.port, self.plan.probe_path), timeout_s)
        except asyncio.TimeoutError:
            return False

    def log_excerpt(self, fallback: bool = True) -> tuple[str | None, str]:
        """(the one line of the log that says what went wrong, its last lines); see
        logfiles.excerpt."""
        if self.log_problem is not None:
            return self.log_problem, ""
        return logfiles.excerpt(self.log_path, LOG_TAIL_LINES, fallback)

    def progress_token(self) -> tuple[int, float, int]:
        """Changes while a starting worker does anything: writes its log, uses CPU, or does
        I/O (a download). Equal tokens a heartbeat apart mean it is stuck."""
        import psutil  # only needed under systemd, where start-up heartbeats are sent

        try:
            size = self.log_path.stat().st_size
        except OSError:
            size = 0
        if self._proc is None or self.returncode is not None:
            return (size, 0.0, 0)
        try:
            proc = psutil.Process(self._proc.pid)
            with proc.oneshot():
                cpu = sum(proc.cpu_times()[:2])
                io = proc.io_counters()
            return (size, cpu, io.read_chars + io.write_chars)
        except (psutil.Error, AttributeError):
            return (size, 0.0, 0)

    async def wait_exit(self) -> int:
        """Wait until the process exits (for whatever reason); its return code."""
        assert self._exited is not None, "worker was never started"
        return await asyncio.shield(self._exited)

    async def stop(self) -> None:
        """SIGTERM to the process group (to a ready router child, its exit command), a
        bounded wait, then SIGKILL."""
        if self._exited is None or self._exited.done():
            return
        # A router child that is ready reads its stdin, and needs the command: after a
        # SIGTERM alone it would wait for its stdin's end (it joins the thread that reads
        # it). One still loading has no handler for SIGTERM yet and dies of it; the command
        # is then for the moment it starts reading.
        deadline = self._clock() + self.stop_timeout_s
        commanded = self._channel is not None and self._channel.send_exit()
        if commanded and self._said_ready.is_set():
            self._stop_sent = sent = "its exit command"
            done, _ = await asyncio.wait(
                {self._exited}, timeout=min(_COMMAND_GRACE_S, self.stop_timeout_s))
            if not done:
                # A command read before llama-server's main loop starts is lost (the loop
                # sets its running flag again as it starts); SIGTERM reaches the loop.
                self._stop_sent = sent = "its exit command and SIGTERM"
                self._signal_group(signal.SIGTERM)
        else:
            self._stop_sent = sent = "SIGTERM"
            self._signal_group(signal.SIGTERM)
        done, _ = await asyncio.wait({self._exited},
                                     timeout=max(0.0, deadline - self._clock()))
        if not done:
            log.warning(
                "%s: worker pid %s ignored %s for %g s; sending SIGKILL",
                self.model_id, self.pid, sent, self.stop_timeout_s,
            )
            await self.kill()

    async def kill(self) -> None:
        if self._exited is None or self._exited.done():
            return
        self._stop_sent = (f"SIGKILL after {self._stop_sent}" if self._stop_sent
                           else "SIGKILL")
        self._signal_group(signal.SIGKILL)
        await asyncio.shield(self._exited)

    def _on_exit(self, exited: asyncio.Future[int]) -> None:
        # Children the worker left in its group die with it. Done right at the exit, never
        # later: once the group is empty its id may be recycled for an unrelated process.
        self._signal_group(signal.SIGKILL)
        if self._channel is not None:
            self._channel.close()
        if self.log_problem is None and not exited.cancelled() and exited.exception() is None:
            # The log's last line says how it ended: `logs --previous` after a crash.
            how = describe_exit(exited.result())
            if self._stop_sent:
                how += f" (neuronctl sent {self._stop_sent})"
            logfiles.write_end_line(self.log_path, f"worker pid {self.pid} {how}")

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
