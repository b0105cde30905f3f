"""A local Hugging Face Hub over HTTP, for the real huggingface_hub client (in-process with
`Fetcher(endpoint=...)`, or in a child with HF_ENDPOINT): the tree listing, HEAD and GET
on `resolve/` with Range requests, as huggingface.co answers them.

`hold_at` bytes into a file's first GET, the answer stops sending until `release` is set
(or the server stops): an interrupted transfer a test can cut where it likes. Every
request is recorded (`requests`: method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "a1" * 20
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/?]+)")


class FakeHubServer:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []
        self.hold_at: int | None = None
        self.holding = threading.Event()  # a GET is held at hold_at
        self.release = threading.Event()
        self._held_once: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.answer(self, body=True)

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def gets(self, name: str) -> list[str | None]:
        """The Range header of each GET of file `name`."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + name)]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        tree = _TREE.match(path)
        if tree and tree["repo"] in self.repos:
            entries = [{"type": "file", "path": name, "size": len(content),
                        "oid": hashlib.sha1(content).hexdigest(),
                        "lfs": {"oid": hashlib.sha256(content).hexdigest(),
                                "size": len(content), "pointerSize": 130}}
                       for name, content in self.repos[tree["repo"]].items()]
            self._send(handler, 200, json.dumps(entries).encode(),
                       {"Content-Type": "application/json"}, body)
            return
        resolve = _RESOLVE.match(path)
        files = self.repos.get(resolve["repo"], {}) if resolve else {}
        if resolve is None or resolve["file"] not in files:
            self._send(handler, 404, b'{"error":"Entry not found"}',
                       {"X-Error-Code": "EntryNotFound"}, body)
            return
        content = files[resolve["file"]]
        headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes",
                   "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}
        start = 0
        match = re.match(r"bytes=(\d+)-$", handler.headers.get("Range") or "")
        if match and body:
            start = int(match[1])
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        status = 206 if start else 200
        if not body:
            self._send(handler, status, content, headers, False)
            return
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(content) - start))
        handler.end_headers()
        data = content[start:]
        name = resolve["file"]
        if self.hold_at is not None and name not in self._held_once and start < self.hold_at:
            self._held_once.add(name)
            cut = self.hold_at - start
            handler.wfile.write(data[:cut])
            handler.wfile.flush()
            self.holding.set()
            self.release.wait(30)  # the scenario: a transfer that stalls midway
            handler.close_connection = True
            return  # the rest is never sent: the client sees a broken transfer
        handler.wfile.write(data)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, content: bytes,
              headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        if body:
            handler.wfile.write(content)
