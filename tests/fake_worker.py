"""A stand-in model server for failure-path tests; it behaves as --mode says.

ready        serve GET /health with 200 after --delay seconds
crash        print a message and exit with --code after --delay seconds
hang         run but never open the port
ignore-term  like ready, but ignore SIGTERM
env          like ready, and print the environment to the log first

--crash-if-exists PATH: crash at start when PATH exists, else create it and go on; so the
first start succeeds and every restart after it fails.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"ok"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="ready")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--code", type=int, default=3)
    parser.add_argument("--crash-if-exists", default=None)
    args, _ = parser.parse_known_args()
    print(f"fake worker pid {os.getpid()} mode {args.mode}", flush=True)
    if args.crash_if_exists:
        if os.path.exists(args.crash_if_exists):
            print("fatal: crashing on restart", flush=True)
            sys.exit(args.code)
        open(args.crash_if_exists, "w").close()
    if args.mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.mode == "env":
        for key in sorted(os.environ):
            print(f"ENV {key}={os.environ[key]}", flush=True)
    time.sleep(args.delay)  # the simulated model load
    if args.mode == "crash":
        print("fatal: simulated load failure", flush=True)
        sys.exit(args.code)
    if args.mode == "hang":
        while True:
            time.sleep(3600)  # a hung load: the supervisor must poll, time out and kill it
    server = http.server.HTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
