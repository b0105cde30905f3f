"""A llama-cpp-python worker: llama-cpp-python's OpenAI server for exactly one model.

The supervisor runs this file by path with the interpreter named in
`[harness.llama-cpp-python] python`, passing the server's own command-line flags.
"""

from __future__ import annotations

import os
import sys

# llama_cpp.server lets these environment variables override --host/--port/--config_file.
# The supervisor chose the port and the loopback address; an inherited HOST or PORT must
# not move the worker somewhere it will never be found (or expose it beyond 127.0.0.1).
_OVERRIDING_ENV = ("HOST", "PORT", "CONFIG_FILE")


def main() -> None:
    for name in _OVERRIDING_ENV:
        os.environ.pop(name, None)
    try:
        import llama_cpp
        from llama_cpp.server.__main__ import main as server_main
    except ImportError as exc:
        print(
            f"neuron worker: cannot import llama_cpp.server with {sys.executable}: {exc}\n"
            "install it there with: pip install 'llama-cpp-python[server]'",
            file=sys.stderr,
        )
        sys.exit(3)
    print(
        f"neuron worker: llama-cpp-python {llama_cpp.__version__}, python {sys.version.split()[0]}",
        file=sys.stderr,
        flush=True,
    )
    server_main()


if __name__ == "__main__":
    main()
