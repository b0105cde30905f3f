"""`neuronctl pull`, `models` (`ls`), `show` and `rm`: the model store.

Each asks the daemon when it answers (it owns the cache and knows what is loaded) and
otherwise does the work in the store's child process (storechild.py), so a node can be
provisioned before its service is enabled. A pull shows a progress bar per file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ..client import ApiError, Client, DaemonNotRunning
from ..errors import fail
from ..units import fmt_bytes
from . import storechild
from .base import ConfigOpt, UrlOpt, client, err, print_table, say, warn

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
PULL_EVENTS_READ_S = 30.0


def _node(url: str | None, config: Path | None) -> Client | None:
    """The daemon's client when it answers; None when nothing listens (then the child does
    the work here). A --url that does not answer is an error: another host's cache is not
    ours to write."""
    node = client(url, config, timeout_s=5.0)
    try:
        node.request("GET", "/health")
    except DaemonNotRunning:
        if url is not None:
            fail(f"{url} does not answer; without --url, the store is used directly")
        return None
    except ApiError as exc:
        fail(exc.message)
    return node


def _child(verb: str, args: list[str], config: Path | None) -> Iterator[dict[str, Any]]:
    settings = storechild.read_config(config)
    return storechild.run(verb, args, config, storechild.run_as(settings))


def _last(lines: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The child's one answer and its exit status."""
    answer: dict[str, Any] = {}
    code = 1
    for line in lines:
        if "exit" in line:
            code = int(line["exit"])
        else:
            answer = line
    if "error" in answer:
        fail(str(answer["error"]), code or 1)
    return answer, code


# --- pull -----------------------------------------------------------------------------------


class PullView:
    """A progress bar per file (bytes, rate, time left) on stderr, and one summary line per
    model on stdout; with --json, each event as a JSON line instead."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=False,
            disable=as_json)
        self.tasks: dict[tuple[str, str], TaskID] = {}
        self.failed: list[str] = []
        self.started: dict[str, float] = {}
        self.summary: list[str] = []  # said once the bars are done drawing

    def __enter__(self) -> PullView:
        return self  # the bars start with the first file: nothing cached draws nothing

    def __exit__(self, *exc: object) -> None:
        if self.tasks:
            self.bars.stop()
        for line in self.summary:
            say(line)

    def progress(self, model: str, data: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps({"event": "progress", **data, "model": model}), flush=True)
            return
        file = data.get("file")
        if not file:
            return
        key = (model, file)
        task = self.tasks.get(key)
        if task is None:
            if not self.tasks:
                self.bars.start()
            task = self.tasks[key] = self.bars.add_task(
                f"{model}: {file}", total=data.get("file_total_bytes"))
        done = data.get("file_done_bytes")
        if done is not None:
            self.bars.update(task, completed=done)

    def finished(self, model: str, ok: bool, data: dict[str, Any]) -> None:
        if not ok:
            self.failed.append(model)
        if self.as_json:
            print(json.dumps({"event": "done" if ok else "failed", **data, "model": model}),
                  flush=True)
            return
        for (owner, _), task in self.tasks.items():
            if owner == model and ok:  # a finished file's bar ends full
                total = self.bars.tasks[task].total
                if total is not None:
                    self.bars.update(task, completed=total)
        if not ok:
            warn(f"{model}: {data.get('error') or 'pull failed'}", style="red")
        elif data.get("cached"):
            self.summary.append(f"{model}: already in the cache ({data.get('path')})")
        else:
            took = data.get("elapsed_s")
            said = f" in {took:.1f} s" if isinstance(took, int | float) else ""
            self.summary.append(
                f"{model}: pulled {fmt_bytes(data.get('bytes'))}{said} ({data.get('path')})")


def pull(
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL", show_default=False,
        help="Catalogue ids or Hugging Face repos (ORG/NAME[:QUANT]).")] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Every default and catalogue model of the config.")] = False,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Download models into the node's cache without loading them (resumable)."""
    names = list(models or [])
    if all_:
        settings = storechild.read_config(config)
        names += [m for m in settings.catalogue()
                  if settings.catalogue()[m].path is None and m not in names]
    if not names:
        fail("name a model to pull, or --all for the config's models", 2)
    node = _node(url, config)
    with PullView(json_) as view:
        if node is None:
            _pull_here(names, config, view)
        else:
            _pull_through(node, names, view)
    if view.failed:
        fail(f"{len(view.failed)} of {len(names)} pull(s) failed: {', '.join(view.failed)}")


def _pull_here(names: list[str], config: Path | None, view: PullView) -> None:
    for line in _child("pull", names, config):
        event = line.get("event")
        if "exit" in line:
            if line["exit"] not in (0, 1) and not view.failed:
                view.failed.append("(the store)")
        elif "error" in line and event is None:
            warn(str(line["error"]), style="red")
            view.failed.append("(the store)")
        elif event == "progress":
            view.progress(str(line["model"]), line)
        elif event in ("done", "failed"):
            view.finished(str(line["model"]), event == "done", line)
        elif event == "note":
            warn(f"note: {line.get('message')}")


def _pull_through(node: Client, names: list[str], view: PullView) -> None:
    """`POST /models/pull` for each, then the `pull` events until every one is over."""
    waiting: dict[str, str] = {}  # the pull's model id -> the name asked for
    try:
        for name in names:
            answer = node.request("POST", "/models/pull", {"model_id": name})
            waiting[answer["pull"]["model"]] = name
            view.started[answer["pull"]["model"]] = time.monotonic()
        for event, data in node.events(read_timeout_s=PULL_EVENTS_READ_S):
            pulls = data.get("pulls", []) if event == "snapshot" else \
                [data] if event == "pull" else []
            for entry in pulls:
                model = entry.get("model")
                if model not in waiting:
                    continue
                view.progress(model, entry)
                if entry.get("state") in ("done", "failed"):
                    took = time.monotonic() - view.started.get(model, time.monotonic())
                    view.finished(model, entry["state"] == "done", {
                        **entry, "bytes": entry.get("done_bytes"), "elapsed_s": took,
                        "cached": not entry.get("total_bytes")})
                    del waiting[model]
            if not waiting:
                return
    except (ApiError, DaemonNotRunning) as exc:
        fail(str(getattr(exc, "message", exc)))
    if waiting:
        fail(f"the node ended its event stream before {', '.join(waiting)} finished")


# --- models / ls ----------------------------------------------------------------------------


def _loaded(node: Client | None) -> list[str]:
    if node is None:
        return []
    try:
        return [m["id"] for m in node.models() if m.get("status") == "loaded"]
    except (ApiError, DaemonNotRunning):
        return []


def _when(stamp: float | None) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def store_table(listing: dict[str, Any], width: int | None) -> Table:
    table = Table(width=width, box=None, pad_edge=False)
    for column in ("ID", "SOURCE", "QUANT", "SIZE", "LAST USED", "LOADED"):
        table.add_column(column, no_wrap=column != "SOURCE",
                         justify="right" if column == "SIZE" else "left")
    for m in listing.get("models", []):
        source = f"{m['repo']}/{m['file']}" if m.get("repo") else str(m.get("path"))
        ids = ", ".join(m.get("ids") or []) or "-"
        table.add_row(ids, source, m.get("quant") or "-", fmt_bytes(m.get("size_bytes")),
                      _when(m.get("last_used")), "yes" if m.get("loaded") else "no")
    return table


def models(json_: JsonOpt = False, url: UrlOpt = None, config: ConfigOpt = None) -> None:
    """List every GGUF in the cache and every local path the config names."""
    node = _node(url, config)
    if node is not None:
        try:
            listing = node.request("GET", "/models/store", timeout_s=60.0)
        except ApiError as exc:
            fail(exc.message)
    else:
        listing, _ = _last(_child("ls", [], config))
    if json_:
        print(json.dumps(listing, indent=2))
        return
    if not listing.get("models"):
        say("no models in the cache or the config's paths")
    else:
        print_table(lambda width: store_table(listing, width))
    say(f"total {fmt_bytes(listing.get('total_bytes', 0))} in "
        f"{len(listing.get('models', []))} model(s)")
    for cache in listing.get("caches", []):
        say(f"cache {cache['path']}: {fmt_bytes(cache.get('free_bytes'))} free"
            + ("" if cache.get("exists") else " (not made yet)"))


# --- show -----------------------------------------------------------------------------------


def _show_lines(facts: dict[str, Any]) -> list[str]:
    h = facts["header"]
    lines = [
        f"{facts['id']}: {facts['path']}" + (f" ({facts['parts']} parts)"
                                             if facts.get("parts", 1) > 1 else ""),
        f"  architecture    {h.get('architecture') or '?'}",
        f"  parameters      {h.get('parameters_label') or '?'}",
        f"  quantization    {h.get('quantization') or '?'}",
        f"  trained context {h.get('context_length') or '?'}",
        f"  layers          {h.get('layers') or '?'}",
        f"  chat template   {'yes' if h.get('chat_template') else 'no'}",
        f"  embedding model {'yes' if h.get('embedding_model') else 'no'}",
        f"  size on disk    {fmt_bytes(facts.get('size_bytes'))}",
    ]
    estimates = facts["estimate"]
    seen = set()
    for label, est in (("configured", estimates["configured"]),
                       ("trained", estimates["trained"])):
        if est["n_ctx"] in seen:
            continue
        seen.add(est["n_ctx"])
        lines.append(f"  at n_ctx {est['n_ctx']} ({label}): needs "
                     f"{fmt_bytes(est['need_mb'] * 1024 * 1024)} ({est['describe']})")
        for gpu in est["gpus"]:
            lines.append(f"    {gpu['verdict']}")
        if not est["gpus"]:
            lines.append("    no GPU seen (nvidia-smi): it would run on the CPU")
    return lines


def show(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="A model id, ORG/NAME[:QUANT] or a GGUF path.")],
    json_: JsonOpt = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """What a model's GGUF header says, and whether it fits each GPU."""
    path = Path(model)
    facts: dict[str, Any] | None = None
    if not (model.lower().endswith(".gguf") or path.exists()):
        node = _node(url, config)
        if node is not None:
            try:
                facts = node.request("GET", f"/models/{model}/show", timeout_s=60.0)
            except ApiError as exc:
                # A repo the node does not list is still shown from the cache here.
                if exc.status != 404 or (":" not in model and model.count("/") != 1):
                    fail(exc.message)
    else:
        model = str(path.resolve())
    if facts is None:
        facts = _last(_child("show", [model], config))[0]["show"]
    if json_:
        print(json.dumps(facts, indent=2))
        return
    for line in _show_lines(facts):
        say(line)


# --- rm -------------------------------------------------------------------------------------


def rm(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="A model id or ORG/NAME[:QUANT].")],
    force: Annotated[bool, typer.Option(
        "--force", help="Remove it even when it is loaded or a default model.")] = False,
    json_: JsonOpt = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Remove a model's files from the cache; says how much was freed."""
    if url is not None:
        fail("rm works on this host's cache: run it on the node, without --url", 2)
    loaded = _loaded(_node(None, config))
    args = [model, *(["--force"] if force else [])]
    for model_id in loaded:
        args += ["--loaded", model_id]
    answer, _ = _last(_child("rm", args, config))
    removal = answer["removal"]
    if json_:
        print(json.dumps(removal, indent=2))
        return
    for m in removal["removed"]:
        say(f"removed {m['repo']}/{m['file']} ({fmt_bytes(m['size_bytes'])})")
    say(f"freed {fmt_bytes(removal['freed_bytes'])}")
