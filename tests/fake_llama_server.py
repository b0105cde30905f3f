"""A stand-in for llama.cpp's `llama-server`, with its readiness semantics.

It takes llama-server's flags (`-m FILE --host H --port P`, the rest ignored), opens its
port at once, answers GET /health with 503 `{"error":{"code":503,"message":"Loading model",
...}}` for --fake-load-s seconds and 200 `{"status":"ok"}` after; GET /v1/models answers 200
all along, as the real one does, so a supervisor probing it would call the model ready too
early; GET /props says its `total_slots` (after --fake-props-s; 503 the first
--fake-props-busy times). A POST (a completion)
answers `max_tokens` characters with OpenAI's `usage` (a chat completion's shape on
`/v1/chat/completions`, which LiteLLM's proxy checks). Every request and its status is
printed (to the worker's log), and so is the environment, so tests can see
CUDA_VISIBLE_DEVICES.

A POST can ask for a misbehaving answer by fields of its body (never sent by a real
client): `hold_s` (answer only after that long), `answer_mib` (an answer that long, in
1 MiB writes, with its Content-Length unless `no_length`), `stall_after_bytes` (stop
sending after that many bytes of it, and wait a minute, the connection open), `lie` (a
Content-Length of 1000, 10 bytes, then the same wait) and `extra_headers` (that many more
headers). A streamed request (`"stream": true`) is answered with chat chunks as
server-sent events; one whose last message says "die mid-stream" gets two chunks, and then
the process exits (code 3), as a worker that crashes while it answers; one whose last
message says "call a tool" calls the first of its `tools` with `{"city": "Oslo"}`, the
arguments in two pieces, as llama-server streams them.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import time
from typing import Any

MIB = 1024 * 1024
STALL_S = 60.0  # a stalled answer waits this long (the supervisor kills it sooner)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake-load-s", type=float, default=0.0)
    # GET /props's total_slots: --parallel's, else llama-server's auto choice (4), unless
    # --fake-slots says otherwise (a build that chooses differently).
    parser.add_argument("-np", "--parallel", type=int, default=4)
    parser.add_argument("--fake-slots", type=int, default=None)
    parser.add_argument("--fake-props-s", type=float, default=0.0)  # GET /props answers late
    parser.add_argument("--fake-props-busy", type=int, default=0)  # ... or 503 that many times
    args, _ = parser.parse_known_args()
    if not os.path.isfile(args.model):
        print(f"error: failed to open GGUF file '{args.model}'", flush=True)
        sys.exit(1)
    print(f"fake llama-server pid {os.getpid()} argv {sys.argv[1:]}", flush=True)
    for key in sorted(os.environ):
        print(f"ENV {key}={os.environ[key]}", flush=True)
    ready_at = time.monotonic() + args.fake_load_s
    busy = [args.fake_props_busy]

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
            elif self.path == "/props" and busy[0] > 0:
                busy[0] -= 1
                status, body = 503, {"error": {"code": 503, "message": "busy"}}
            elif self.path == "/props":
                time.sleep(args.fake_props_s)
                status, body = 200, {"total_slots": args.fake_slots or args.parallel}
            elif self.path == "/slots":  # no slot holds anything: a prompt cache saves none
                status, body = 200, []
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
            time.sleep(float(request.get("hold_s") or 0))  # a slow answer: the scenario
            if request.get("answer_mib") or request.get("lie") or request.get("extra_headers"):
                self.misbehave(request)
                return
            tokens = int(request.get("max_tokens") or 4)
            if request.get("stream"):
                self.stream(request, tokens)
                return
            body = {"object": "text_completion", "choices": [{"index": 0, "text": "x" * tokens,
                                                               "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                              "total_tokens": tokens + 1}}
            if self.path.endswith("/chat/completions"):  # in the shape a client checks
                body = {**body, "object": "chat.completion", "id": "chatcmpl-fake",
                        "created": int(time.time()), "model": args.model,
                        "choices": [{"index": 0, "finish_reason": "length", "message": {
                            "role": "assistant", "content": "x" * tokens}}]}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            print(f"POST {self.path} 200", flush=True)

        def stream(self, request: dict[str, Any], tokens: int) -> None:
            messages = request.get("messages") or [{}]
            dies = messages[-1].get("content") == "die mid-stream"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            if messages[-1].get("content") == "call a tool" and request.get("tools"):
                name = request["tools"][0]["function"]["name"]
                pieces = [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": name, "arguments": '{"city": '}},
                          {"index": 0, "function": {"arguments": '"Oslo"}'}}]
                for piece in pieces:
                    chunk = {"object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                end = {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
                self.wfile.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n")
                return
            for _ in range(2 if dies else tokens):
                chunk = {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            if dies:
                print(f"POST {self.path} dying mid-stream", flush=True)
                os._exit(3)
            last = {"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": tokens,
                          "total_tokens": tokens + 1}}
            self.wfile.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
            print(f"POST {self.path} 200 streamed", flush=True)

        def misbehave(self, request: dict[str, Any]) -> None:
            prefix, suffix = b'{"data": "', b'"}'
            size = 1000 if request.get("lie") else (
                int(request.get("answer_mib") or 0) * MIB + len(prefix) + len(suffix))
            stall_at = 10 if request.get("lie") else request.get("stall_after_bytes")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if not request.get("no_length"):
                self.send_header("Content-Length", str(size))
            for i in range(int(request.get("extra_headers") or 0)):
                self.send_header(f"X-Extra-{i}", "1")
            self.end_headers()
            filler = size - len(prefix) - len(suffix)
            parts = [prefix, *[b"x" * min(MIB, filler - i) for i in range(0, filler, MIB)],
                     suffix]
            sent = 0
            for part in parts:
                if stall_at is not None and sent + len(part) > int(stall_at):
                    self.wfile.write(part[:int(stall_at) - sent])
                    self.wfile.flush()
                    print(f"POST {self.path} stalled after {stall_at} bytes", flush=True)
                    time.sleep(STALL_S)  # a stalled answer: the scenario
                    return
                self.wfile.write(part)
                sent += len(part)
            print(f"POST {self.path} 200 {size} bytes", flush=True)

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
