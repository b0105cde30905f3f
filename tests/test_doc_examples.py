"""Every shell example in README.md and docs/ is run against a real node, and what it prints
is compared, in shape, with what the doc shows beside it.

An example is a `$ command` line of a transcript (its output follows it), or a line of an
`sh` block (its output, if shown, is the `json` or plain block right after). Each one either
runs here or is skipped for a reason this file names (root, systemd, a production host's
files, a stream that never ends); a new example that fits no reason runs, so a doc cannot
drift unseen. Shapes, not values: numbers, quoted strings and durations are wildcards, JSON
is compared by the keys the doc shows, a table by its header. The examples run in the
docs' order on one node, as a reader would run them (a `load` before its `unload`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import NEURONCTL, clean_env, free_port, kill_quietly, llama_required, poll_until

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n?", re.S | re.M)
SHELL_LANGS = {"sh", "console", "bash", "shell", ""}

# What the test node serves, every model on the tiny GGUF: the ids the docs use.
DEFAULT_MODELS = ("gemma-3-270m", "Qwen/Qwen3-0.6B-GGUF", "qwen3-0.6b")
CATALOGUE = ("qwen3-q8",)

# Reasons an example cannot run here, by the first word of its command.
NOT_HERE = {
    "sudo": "needs root on a production host",
    "systemctl": "needs systemd as PID 1",
    "journalctl": "needs the systemd journal",
    "make": "Makefile targets: CI runs `make test`, tests/test_packaging.py `make srpm`",
    "dnf": "installs the RPM on a Fedora host",
    "rpmbuild": "tests/test_packaging.py builds the RPM",
    "git": "part of the RPM build recipe (tests/test_packaging.py)",
    "cp": "part of the RPM build recipe (tests/test_packaging.py)",
    "openssl": "writes the key under /etc/neuron",
    "llama-server": "the command line neuronctl builds, shown, not run",
}
# Reasons an example cannot run here, by what its command says.
NOT_HERE_PATTERNS = {
    r"(^| )(-f|-F|--follow|--watch|-w)( |$)": "follows forever (tests/cli/test_app.py follows)",
    r"\$KEY\b": "needs a node with an API key (tests/api/test_security.py)",
    r"--previous": "needs a crash first (tests/cli/test_operator.py)",
    r"^neuronctl key new gateway ": "prints a random key (tests/cli/test_keys.py runs it)",
    r"^(ver|top)=": "part of the RPM build recipe (tests/test_packaging.py)",
    r"^NEURON_[A-Z_]+=\S+$": "an environment listing, not a command",
    r"(/etc|/var|/opt|/srv|/home)/": "names a file on a production host",
    r"\b10\.\d+\.\d+\.\d+\b": "names another host",
    r"localhost:4000\b": "goes through LiteLLM's proxy (tests/fleet/test_litellm.py)",
}
COMMAND_WORDS = {"curl", "neuronctl", ".venv/bin/neuronctl", "url=$(curl", *NOT_HERE}
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


@dataclass
class Example:
    where: str  # file:line
    command: str
    expected: list[str]  # the output the doc shows; empty when it shows none

    def __str__(self) -> str:
        return f"{self.where}: {self.command}"


def _commands(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first line, last line, command) of each command, a trailing backslash joining the
    next line."""
    joined: list[tuple[int, int, str]] = []
    first, parts = 0, list[str]()
    for i, line in enumerate(lines):
        if not parts:
            first = i
        parts.append(line.strip().removesuffix("\\").strip() if parts
                     else line.rstrip().removesuffix("\\").rstrip())
        if not line.rstrip().endswith("\\"):
            joined.append((first, i, " ".join(parts)))
            parts = []
    if parts:
        joined.append((first, len(lines) - 1, " ".join(parts)))
    return joined


def _is_command(command: str) -> bool:
    first = command.split(maxsplit=1)[0] if command.strip() else ""
    return first in COMMAND_WORDS or bool(re.match(r"^[A-Z_]+=", first))


def _strip_comment(command: str) -> str:
    # Two spaces then `#`: the docs' comments; a `#` inside a command has none before it.
    return re.split(r"\s{2,}#", command, maxsplit=1)[0].strip()


def examples() -> Iterator[Example]:
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        blocks = list(FENCE.finditer(text))
        for n, block in enumerate(blocks):
            lang, body = block.group(1), block.group(2)
            if lang not in SHELL_LANGS:
                continue
            start = text[: block.start()].count("\n") + 2  # the block's first line
            lines = body.splitlines()
            where = f"{path.relative_to(ROOT)}:"
            if any(line.startswith("$ ") for line in lines):  # a transcript
                marks = [i for i, line in enumerate(lines) if line.startswith("$ ")]
                for k, i in enumerate(marks):
                    end = marks[k + 1] if k + 1 < len(marks) else len(lines)
                    chunk = [lines[i][2:], *lines[i + 1: end]]
                    _, last, command = _commands(chunk)[0]
                    output = [line for line in chunk[last + 1:] if line.strip()]
                    yield Example(f"{where}{start + i}", command, output)
                continue
            if lang == "" or not lines:
                continue  # output shown on its own, taken with the block before it
            following: list[str] = []
            if n + 1 < len(blocks):
                nxt = blocks[n + 1]
                between = text[block.end(): nxt.start()]
                if not between.strip() and nxt.group(1) in ("", "json"):
                    following = [ln for ln in nxt.group(2).splitlines() if ln.strip()]
            real = [c for c in _commands(lines) if _is_command(c[2])]
            for k, (first, last, command) in enumerate(real):
                upto = real[k + 1][0] if k + 1 < len(real) else len(lines)
                output = [ln for ln in lines[last + 1: upto] if ln.strip()]
                if not output and k == len(real) - 1:
                    output = following
                yield Example(f"{where}{start + first}", command, output)


# Files the test node has a stand-in for (the tiny GGUF).
STAND_INS = re.compile(r"\S*gemma-3-270m-q4_k_m\.gguf|/srv/models/tiny\.gguf")


def skip_reason(example: Example) -> str | None:
    first = example.command.split(maxsplit=1)[0]
    if first in NOT_HERE:
        return NOT_HERE[first]
    if "# with 64 waiting" in example.command:  # what the comment says it needs
        return "needs 64 queued requests (tests/api/test_traffic.py)"
    said = STAND_INS.sub("MODEL.gguf", _strip_comment(example.command))
    for pattern, reason in NOT_HERE_PATTERNS.items():
        if re.search(pattern, said):
            return reason
    return None


# --- shapes ---------------------------------------------------------------------------------


def line_pattern(line: str) -> str:
    """A regex for lines shaped like `line`: numbers, quoted strings and durations match
    any, `...` anything, runs of spaces one or more spaces."""
    parts = []
    for token in line.strip().split():
        if token in ("...", "…"):
            parts.append(".*")
        elif DURATION.match(token) and any(c.isdigit() for c in token):
            parts.append(r"\S+")
        else:
            escaped = re.escape(token)
            escaped = re.sub(r'"(?:[^"\\]|\\.)*"', '"[^"]*"', escaped)
            escaped = re.sub(r"'(?:[^'\\]|\\.)*'", "'[^']*'", escaped)
            escaped = re.sub(r"\d+(?:\\\.\d+)?", r"\\d+(?:\\.\\d+)?", escaped)
            escaped = escaped.replace(r"\.\.\.", ".*")
            parts.append(escaped)
    return r"\s+".join(parts)


def json_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in json_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in json_keys(v)}
    return set()


def assert_same_shape(example: Example, output: str) -> None:
    shown = "\n".join(example.expected)
    if shown.lstrip().startswith(("{", "[")):  # JSON: the keys the doc shows, at least
        value = json.loads(output)
        assert isinstance(value, list) == shown.lstrip().startswith("["), (example, output)
        keys = set(re.findall(r'"(\w+)":', shown))
        missing = keys - json_keys(value)
        assert not missing, f"{example}: the doc shows {sorted(missing)}; got {output[:500]}"
        return
    if shown.startswith("event: "):  # server-sent events: each event's data keys
        got: dict[str, set[str]] = {}
        for name, data in re.findall(r"^event: (\w+)\ndata: (.*)$", output, re.M):
            got.setdefault(name, set()).update(json_keys(json.loads(data)))
        for name, data in re.findall(r"^event: (\w+)\ndata: (.*)$", shown, re.M):
            if name in got:
                keys = set(re.findall(r'"(\w+)":', data))
                assert keys <= got[name], f"{example}: {name} lacks {keys - got[name]}"
        assert got, f"{example}: no events in {output[:300]!r}"
        return
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, f"{example}: printed nothing; the doc shows {example.expected[0]!r}"
    if re.search(r"(^|/)neuronctl chat ", example.command):
        return  # the model's own words (the test node's tiny model writes noise): any text
    expected = example.expected
    if re.search(r"(^|/)neuronctl status", example.command) and expected[0].startswith("node "):
        # The doc shows a terminal, where the table is headed by the node that answered;
        # run here, stdout is a pipe and holds the table alone.
        expected = expected[1:]
    pattern = line_pattern(expected[0])
    assert re.fullmatch(pattern, lines[0].strip()), \
        f"{example}:\n doc: {expected[0]!r}\n got: {lines[0]!r}"


# --- the node -------------------------------------------------------------------------------


@dataclass
class DocNode:
    port: int
    config: Path
    tiny: Path
    tmp: Path

    def substitute(self, command: str) -> str:
        command = command.replace("localhost:13131", f"127.0.0.1:{self.port}")
        command = re.sub(r"(^|\s)(\.venv/bin/)?neuronctl\b", rf"\1{NEURONCTL}", command)
        command = command.replace("config/neuron.demo.toml", str(self.config))
        command = STAND_INS.sub(str(self.tiny), _strip_comment(command))
        if command.startswith("curl "):  # an HTTP error must fail the example
            command = "curl --fail-with-body --max-time 60 " + command[len("curl "):]
        return command


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocNode]:
    from .tiny_gguf import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("docnode")
    tiny = write_tiny_gguf(tmp / "tiny.gguf")
    port = free_port()
    config = tmp / "neuron.toml"
    entries = "".join(f'[[default_models]]\nmodel_id = "{m}"\npath = "{tiny}"\nn_ctx = 2048\n'
                      for m in DEFAULT_MODELS)
    entries += "".join(f'[[models]]\nmodel_id = "{m}"\npath = "{tiny}"\n' for m in CATALOGUE)
    config.write_text(f'host = "127.0.0.1"\nport = {port}\nlog_dir = "{tmp}/log"\n'
                      f'state_dir = "{tmp}/state"\nstop_timeout_s = 2.0\n{entries}')
    journal = tmp / "daemon.log"
    with journal.open("wb") as out:
        proc = subprocess.Popen([NEURONCTL, "start", "--config", str(config)],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(lambda: b"listening on" in journal.read_bytes() or proc.poll() is not None,
                   120)
        assert proc.poll() is None, journal.read_text()
        yield DocNode(port, config, tiny, tmp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            kill_quietly(proc.pid)


ALL = list(examples())


def test_the_docs_have_examples_and_most_run_here() -> None:
    runnable = [e for e in ALL if skip_reason(e) is None]
    # A parser that lost its way would find none, and the test below would pass on nothing.
    assert len(ALL) >= 30, [str(e) for e in ALL]
    assert len(runnable) >= 15, [str(e) for e in runnable]
    assert any(e.expected for e in runnable)


def test_line_patterns_compare_shapes_not_values() -> None:
    pattern = line_pattern("second loaded in 0.7s: model 'second' at http://127.0.0.1:13131/v1")
    assert re.fullmatch(pattern, "second loaded in 12.5s: model 'x' at http://127.0.0.1:4000/v1")
    assert not re.fullmatch(pattern, "second failed in 1s: model 'x' at http://127.0.0.1:4000/v1")
    header = line_pattern("MODEL  STATUS  MEMORY   DEVICES   CTX  UNTIL   Q/RUN  UPTIME  RESTARTS")
    assert re.fullmatch(header, "MODEL STATUS MEMORY DEVICES CTX UNTIL Q/RUN UPTIME RESTARTS")
    assert not re.fullmatch(header, "MODEL STATUS MEMORY DEVICES CTX Q/RUN UPTIME RESTARTS")
    row = line_pattern("gemma-3-270m  loaded  301 MiB  CPU      2048  pinned  0/0    1m05s   0")
    assert re.fullmatch(row, "gemma-3-270m  loaded  48 MiB  CPU  2048  pinned  0/0  3s  0")


def _events_during(node: DocNode, command: str) -> subprocess.CompletedProcess[str]:
    """`curl -N .../models/events` for 3 s, while a model loads and unloads, so the stream
    has state events to compare."""
    def churn() -> None:
        body = json.dumps({"model_id": "tiny-events", "path": str(node.tiny)}).encode()
        base = f"http://127.0.0.1:{node.port}"
        for route, data in (("/models/load", body),
                            ("/models/unload", b'{"model_id": "tiny-events"}')):
            request = urllib.request.Request(base + route, data,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60):
                pass

    loader = threading.Timer(0.5, churn)
    loader.start()
    try:
        return subprocess.run(command.replace("curl ", "curl -s --max-time 4 ", 1), shell=True,
                              capture_output=True, text=True, timeout=60, env=_env(node))
    finally:
        loader.join(60)


def _env(node: DocNode) -> dict[str, str]:
    return clean_env(NEURON_URL=f"http://127.0.0.1:{node.port}", COLUMNS="200")


@llama_required
@pytest.mark.parametrize("example", ALL, ids=[e.where for e in ALL])
def test_shell_example(example: Example, node: DocNode) -> None:
    reason = skip_reason(example)
    if reason is not None:
        pytest.skip(reason)
    if example.command.startswith("url=$("):  # the README's next line needs $url
        return
    command = node.substitute(example.command)
    if "$url" in command:
        got = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{node.port}/models/gemma-3-270m/endpoint", timeout=30).read())
        command = command.replace("$url", shlex.quote(got["url"]))
    if "/models/events" in command and "-N" in command.split():
        result = _events_during(node, command.replace("curl --fail-with-body --max-time 60 ",
                                                      "curl ", 1))
        assert result.returncode in (0, 28), result.stderr  # 28: curl's --max-time
    else:
        result = subprocess.run(command, shell=True, capture_output=True, text=True,
                                timeout=120, env=_env(node), cwd=ROOT)
        assert result.returncode == 0, f"{example}\n{result.stdout}\n{result.stderr}"
    if example.expected:
        assert_same_shape(example, result.stdout)
    assert "Traceback" not in result.stderr


def python_examples() -> Iterator[tuple[str, str]]:
    """(file:line, code) of each `python` block that talks to localhost:13131: a client
    library's example (docs/clients.md), run as written against the test node."""
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            if block.group(1) == "python" and "localhost:13131" in block.group(2):
                line = text[: block.start()].count("\n") + 2
                yield f"{path.relative_to(ROOT)}:{line}", block.group(2)


PYTHON = list(python_examples())


def test_the_client_pages_python_examples_are_found() -> None:
    assert len([where for where, _ in PYTHON if where.startswith("docs/clients.md")]) >= 2


@llama_required
@pytest.mark.parametrize("code", [code for _, code in PYTHON], ids=[w for w, _ in PYTHON])
def test_python_example(code: str, node: DocNode) -> None:
    code = code.replace("localhost:13131", f"127.0.0.1:{node.port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=_env(node), cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip()


def test_examples_show_no_private_worker_addresses_as_what_to_use() -> None:
    # `load` prints the node's /v1 URL, never the worker's port: the README must agree.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    load_lines = [line for line in readme.splitlines() if " loaded in " in line]
    assert load_lines and all("/v1" in line for line in load_lines)


def test_the_node_fixture_serves_every_id_the_examples_name(node: DocNode) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/models", timeout=30) as resp:
        listed = {m["id"]: m["status"] for m in json.loads(resp.read())}
    assert all(listed[m] == "loaded" for m in DEFAULT_MODELS), listed
    assert "qwen3-q8" in listed  # in the catalogue (api.md's example may have loaded it)
    assert os.path.exists(node.tiny)
