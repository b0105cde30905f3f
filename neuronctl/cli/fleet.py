"""`neuronctl fleet ...`: commands over many nodes at once (docs/fleet.md).

Nodes are named on the command line, never by a `NEURON_FLEET_*` variable: the node reads
every `NEURON_*` variable as config and refuses the ones it does not know.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ..client import normalize_url
from ..errors import fail
from ..fleet import nodes as fleet
from ..fsutil import write_atomically
from . import formats
from .base import print_table

EX_INCOMPLETE = 3  # the config is written, without the nodes that did not answer

app = typer.Typer(
    help="Many nodes behind one endpoint: LiteLLM's proxy config, one status table.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

NodesArg = Annotated[
    list[str], typer.Argument(metavar="NODE_URL", show_default=False,
                              help="Each node's address: http://HOST:PORT, HOST:PORT or HOST.")
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="NEURON_API_KEY", metavar="KEY",
                 help="The nodes' API key."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.1, max=600.0, metavar="SECONDS",
                        help="Seconds to wait for each node.")
]
STATUS_STYLES = {**formats.STATUS_STYLES, "unreachable": "red"}


_fail = fail  # the package's one: `_write_if_changed` calls it so


def _urls(nodes: list[str]) -> list[str]:
    urls = []
    for node in nodes:
        try:
            urls.append(normalize_url(node))
        except ValueError as exc:
            fail(f"NODE_URL: {exc}", 2)
    return urls


def _write_if_changed(path: Path, text: str, mode: int = 0o600) -> bool:
    """Replace `path` with `text` atomically, only if it differs: a systemd path unit that
    restarts the proxy on change must not see a change that is none. Mode 0600: the config
    holds the nodes' key."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"--out: cannot read {path}: {exc}", 1)
    try:
        write_atomically(path, text.encode("utf-8"), mode=mode)
    except OSError as exc:
        # Only creating the temporary file names one path: nothing was written at all.
        if exc.filename is not None and exc.filename2 is None:
            _fail(f"--out: cannot write in {path.parent}: {exc.strerror}", 1)
        _fail(f"--out: cannot write {path}: {exc.strerror}", 1)
    return True


@app.command("litellm-config")
def litellm_config(
    nodes: NodesArg,
    out_file: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (only when it changes) "
                                                      "[default: stdout]")
    ] = None,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 5.0,
    redis: Annotated[
        bool, typer.Option("--redis", help="Share cooldowns between proxies through Redis "
                                           "($REDIS_HOST, $REDIS_PORT, $REDIS_PASSWORD)")
    ] = False,
    routing_hook: Annotated[
        bool, typer.Option("--routing-hook/--no-routing-hook",
                           help="With --out: write neuron_routing.py beside the config and "
                                "name it, so the proxy prefers nodes where a model is warm")
    ] = True,
) -> None:
    """Write LiteLLM's proxy config: a deployment per servable model per node.

    Exit status: 0 complete; 3 written without the nodes that did not answer (each named on
    stderr); 1 nothing written (no node answered, or none serves a model); 2 a bad argument.
    """
    urls = _urls(nodes)
    # The hook is a file beside the config: printed to stdout, the config goes without it.
    hook = routing_hook and out_file is not None
    read = fleet.read_nodes(urls, api_key, timeout, as_proxy=True)
    result = fleet.litellm_config(read, api_key, redis, hook)
    for url, why in result.left_out:
        sys.stderr.write(f"neuronctl: left out {url}: {why}\n")
    if result.empty:
        fail("no model to serve on any node that answered; nothing written", 1)
    text = fleet.render(result, urls)
    if out_file is None:
        sys.stdout.write(text)
    else:
        if hook:  # first: the config never names a module that is not there
            _write_if_changed(out_file.parent / f"{fleet.HOOK_MODULE}.py",
                              fleet.hook_source().decode("utf-8"), mode=0o644)
        changed = _write_if_changed(out_file, text)
        count = len(result.config["model_list"])
        sys.stderr.write(f"neuronctl: {out_file}: {count} deployments"
                         f"{'' if changed else ', unchanged'}\n")
    if not result.complete:
        raise typer.Exit(EX_INCOMPLETE)


def _memory(m: dict[str, Any]) -> str:
    return formats.fmt_memory(m, sep=", ")  # one line per model: a fleet table is long


def _queue(m: dict[str, Any]) -> str:
    if m.get("queued") is None or m.get("in_flight") is None:
        return "-"
    return f"{m['queued']}/{m['in_flight']}"


def status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("NODE", "MODEL", "STATUS", "MEMORY", "Q/RUN", "GATEWAY"):
        table.add_column(header, overflow="fold")
    for row in rows:
        node = row["node_id"] or row["url"]
        m = row["model"]
        if row["error"] is not None:
            table.add_row(node, "-", Text("unreachable", style="red"), "-", "-", "-")
        elif m is None:
            table.add_row(node, Text("no models", style="dim"), "-", "-", "-", "-")
        else:
            status = str(m.get("status"))
            table.add_row(node, Text(m["id"]), Text(status, style=STATUS_STYLES.get(status, "")),
                          _memory(m), _queue(m), "serves" if fleet.servable(m) else "-")
    return table


@app.command("status")
def status(
    nodes: NodesArg,
    json_: Annotated[bool, typer.Option("--json", help="Print every node's answer as JSON.")]
    = False,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """One table of every node and its models. Exit status 1 when a node does not answer."""
    read = fleet.read_nodes(_urls(nodes), api_key, timeout)
    if json_:
        print(json.dumps([{"url": n.url, "node_id": n.node_id, "incarnation": n.incarnation,
                           "error": n.error, "models": n.models} for n in read], indent=2))
    else:
        rows = fleet.status_rows(read)
        print_table(lambda _width: status_table(rows))  # folds to a terminal's width itself
        for node in read:
            if node.error is not None:
                sys.stderr.write(f"neuronctl: {node.url}: {node.error}\n")
    if not all(n.answered for n in read):
        raise typer.Exit(1)
