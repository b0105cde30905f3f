"""A stand-in for llama.cpp's `llama-server`, with its readiness semantics.

It takes llama-server's flags (`-m FILE --host H --port P`, the rest ignored), opens its
port at once, answers GET /health with 503 `{"error":{"code":503,"message":"Loading model",
...}}` for --fake-load-s seconds and 200 `{"status":"ok"}` after; GET /v1/models answers 200
all along, as the real one does, so a supervisor probing it would call the model ready too
early. A POST (a completion) answers `max_tokens` characters with OpenAI's `usage`. Every
request and its status is printed (to the worker's log), and so is the environment, so
tests can see CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake-load-s", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    if not os.path.isfile(args.model):
        print(f"error: failed to open GGUF file '{args.model}'", flush=True)
        sys.exit(1)
    print(f"fake llama-server pid {os.getpid()} argv {sys.argv[1:]}", flush=True)
    for key in sorted(os.environ):
        print(f"ENV {key}={os.environ[key]}", flush=True)
    ready_at = time.monotonic() + args.fake_load_s

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                if time.monotonic() < ready_at:
                    status, body = 503, {"error": {"code": 503, "message": "Loading model",
                                                   "type": "unavailable_error"}}
                else:
                    status, body = 200, {"status": "ok"}
            elif self.path == "/v1/models":
                status, body = 200, {"object": "list", "data": [{"id": args.model}]}
            else:
                status, body = 404, {"error": {"code": 404, "message": "File Not Found"}}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            print(f"GET {self.path} {status}", flush=True)

        def do_POST(self) -> None:
            # A completion of `max_tokens` tokens (default 4), with OpenAI's usage.
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            tokens = int(request.get("max_tokens") or 4)
            body = {"object": "text_completion", "choices": [{"index": 0, "text": "x" * tokens,
                                                               "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                              "total_tokens": tokens + 1}}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            print(f"POST {self.path} 200", flush=True)

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
