"""The API's socket before aiohttp sees it: the early bind, the claim that keeps a second
supervisor off the port, and the file descriptors the listener may spend.

No aiohttp here: this runs before activation, where start-up time is measured.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket

log = logging.getLogger("neuronctl")

# Descriptors kept for everything but client connections: workers' spawn pipes and log
# files, the pooled connections to workers, workers.json, nvidia-smi, Python itself.
FD_RESERVE = 256
# The default cap never goes past this, however high the fd limit: each connection costs
# memory too, and a node with this many clients at once is overloaded anyway.
DEFAULT_MAX_CONNECTIONS = 4096


class ListenerSocket(socket.socket):
    """The TCP socket, plus the claim on its port, which outlives it: closing the listener
    at shutdown must not let another supervisor load models on the port while this one is
    still stopping its workers. `release()` ends both."""

    port_claim: socket.socket | None = None

    def release(self) -> None:
        self.close()
        if self.port_claim is not None:
            self.port_claim.close()
            self.port_claim = None


def claim_port(port: int) -> socket.socket:
    """Bind the abstract unix socket named after `port`, or raise OSError(EADDRINUSE).

    Two supervisors on one port both get their early TCP bind (SO_REUSEADDR, nobody
    listening yet): only this says the port is taken before a model is loaded. Abstract
    names belong to the network namespace, as ports do, and the kernel frees one when its
    process dies, however it dies; the socket is close-on-exec, so no worker inherits it."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0neuronctl-port-{port}")
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(errno.EADDRINUSE, f"port {port} is in use (by another neuronctl start, "
                      "which may still be loading its models)") from None
    return claim


def bind(host: str, port: int) -> ListenerSocket:
    """Bind, but do not listen yet; claim the port. Raises OSError, its strerror one line."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = ListenerSocket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # With SO_REUSEADDR, Linux refuses the bind only while someone listens there.
            raise OSError(errno.EADDRINUSE, f"port {port} is in use (another process listens "
                          f"on it: ss -ltnp 'sport = :{port}')") from None
        sock.port_claim = claim_port(sock.getsockname()[1])
    except OSError:
        sock.close()
        raise
    return sock


def release(sock: socket.socket) -> None:
    """Close the listener and give up its port claim (a plain socket is only closed)."""
    if isinstance(sock, ListenerSocket):
        sock.release()
    else:
        sock.close()


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now.

    The default soft limit (1024) is what a slowloris exhausts first; the hard limit is
    what the administrator (or the unit's LimitNOFILE=) allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # The kernel refuses a soft limit above fs.nr_open.
        target = _nr_open() or soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
            return soft
        log.debug("open files limit raised from %d to %d", soft, target)
        return target
    log.debug("open files limit: %d", soft)
    return soft


def _nr_open() -> int | None:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft


def default_max_connections(fds: int) -> int:
    """Half of what the fd limit leaves after FD_RESERVE: a /v1 request holds two
    descriptors, its client's and the pooled one to the worker."""
    return max(16, min(DEFAULT_MAX_CONNECTIONS, (fds - FD_RESERVE) // 2))


def max_connections(configured: int | None, fds: int) -> int:
    """The cap: the config's, else the default for `fds`; a configured cap the fd limit
    cannot hold is kept, with a warning."""
    if configured is None:
        return default_max_connections(fds)
    if 2 * configured + FD_RESERVE > fds:
        log.warning("max_connections = %d may exhaust the open files limit (%d): connections "
                    "beyond %d would leave workers no descriptors to start with; raise "
                    "LimitNOFILE= or lower max_connections", configured, fds,
                    max(0, (fds - FD_RESERVE) // 2))
    return configured
