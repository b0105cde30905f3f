"""A small synchronous client for the control API, used by the CLI.

The standard library is enough here and keeps `neuronctl status` quick to start.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG_PATH, load_config

DEFAULT_URL = "http://127.0.0.1:13131"


class DaemonNotRunning(Exception):
    def __init__(self, url: str) -> None:
        super().__init__(f"neuron is not running at {url}")
        self.url = url


class ApiError(Exception):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body


def resolve_url(url: str | None, config_path: Path | None) -> str:
    """`--url`, else NEURON_URL, else the port in the config file, else the default."""
    if url:
        return url.rstrip("/")
    if os.environ.get("NEURON_URL"):
        return os.environ["NEURON_URL"].rstrip("/")
    path = config_path
    if path is None and os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        config = load_config(path)
        # A wildcard listener is reachable on loopback; a specific address only on itself.
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{config.port}"
    return DEFAULT_URL


class Client:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def request(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
                message = payload.get("error", raw.decode()) if isinstance(payload, dict) else raw
            except (json.JSONDecodeError, UnicodeDecodeError):
                payload, message = None, f"HTTP {exc.code} {exc.reason}"
            raise ApiError(exc.code, str(message), payload) from None
        except TimeoutError:
            waited = timeout_s or self.timeout_s
            raise ApiError(0, f"no answer from {self.url} within {waited:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise ApiError(0, f"no answer from {self.url}: {exc.reason}") from None
            raise DaemonNotRunning(self.url) from None
        except ConnectionError:  # refused, or reset before an answer
            raise DaemonNotRunning(self.url) from None

    def models(self) -> list[dict[str, Any]]:
        result = self.request("GET", "/models")
        return result if isinstance(result, list) else []

    def load(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        return dict(self.request("POST", "/models/load", spec, timeout_s=timeout_s))

    def unload(self, model_id: str) -> dict[str, Any]:
        return dict(self.request("POST", "/models/unload", {"model_id": model_id}))
