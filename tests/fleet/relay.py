"""A TCP relay in front of a node, for the routing hook's tests: it counts every HTTP request
that passes (method and path), can stall what a node sends on its event streams (a stalled
`/models/events`, the node itself fine) and can answer `/v1` requests 500 itself (a failure
the hook cannot foresee). Threads and sockets only; every socket it opened is closed by
`close()`."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

_BODY = b'{"error": {"message": "the relay failed it"}}'
FAILED = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n" % len(_BODY)) + _BODY


class Relay:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "GET /models/events?..." of every request, in order
        # `traffic` events passed on, by event stream (connection) while it is open
        self.streams: dict[int, int] = {}
        self.stalled = threading.Event()
        self.failing = threading.Event()
        self.closed = False
        self.sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.startswith(prefix))

    def heard(self) -> dict[int, int]:
        with self.lock:
            return dict(self.streams)

    def fresh_since(self, before: dict[int, int], frames: int, streams: int) -> bool:
        """Whether at least `streams` event streams are open and every one open now has
        passed on `frames` more `traffic` events since `before` (a new one counts from 0)."""
        now = self.heard()
        return len(now) >= streams and all(n - before.get(k, 0) >= frames for k, n in now.items())

    def close(self) -> None:
        self.closed = True
        with self.lock:
            opened = [self.listener, *self.sockets]
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _keep(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.add(sock)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._keep(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:  # the node is down: the client sees the connection close
            client.close()
            return
        upstream.settimeout(None)
        self._keep(upstream)
        events = threading.Event()
        threading.Thread(target=self._answers, args=(upstream, client, events),
                         daemon=True).start()
        try:
            self._requests(client, upstream, events)
        except OSError:
            pass  # either side went away: the other sees its connection end
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

    def _requests(self, client: socket.socket, upstream: socket.socket,
                  events: threading.Event) -> None:
        """Requests one by one (keep-alive), each counted, forwarded or failed here."""
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            while len(buffer) < length:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            request = " ".join(lines[0].split()[:2])
            with self.lock:
                self.requests.append(request)
            if request.startswith("GET /models/events"):
                events.set()
            if self.failing.is_set() and request.startswith("POST /v1/"):
                client.sendall(FAILED)
                continue
            upstream.sendall(head + b"\r\n\r\n" + body)

    def _answers(self, upstream: socket.socket, client: socket.socket,
                 events: threading.Event) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    return
                while events.is_set() and self.stalled.is_set() and not self.closed:
                    time.sleep(0.02)  # held back: the stream stalls, the node is fine
                client.sendall(data)
                if events.is_set():
                    with self.lock:
                        self.streams[id(events)] = (self.streams.get(id(events), 0)
                                                    + data.count(b"event: traffic"))
        except OSError:
            return
        finally:
            with self.lock:
                self.streams.pop(id(events), None)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
