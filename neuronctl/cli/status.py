"""`neuronctl status` (and `ps`), `status --watch` and `events`: the node's models, as
they are and as they change (the daemon's `GET /models` and `GET /models/events`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Group, RenderableType
from rich.text import Text

from ..client import ApiError, Client, DaemonNotRunning
from ..errors import fail
from ..states import WorkerState, journal_transition
from .base import ConfigOpt, UrlOpt, call, client, out, print_table, say, warn
from .formats import fmt_download, status_table


def status(
    json_: Annotated[bool, typer.Option("--json", help="Print the /models list as JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Keep the table up to date until Ctrl-C.")
    ] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Exit 1 when a model is failed or restarting (for scripts).")] = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show every model on the node."""
    if watch:
        if json_:
            fail("--watch draws a table; for JSON as it happens, use neuronctl events --json")
        _watch_status(client(url, config))
    node = client(url, config)
    models = call(node.models)
    if json_:
        print(json.dumps(models, indent=2))
    else:
        _show(node, models)
    if check and any(m.get("status") in ("failed", "restarting") for m in models):
        raise typer.Exit(1)


def _show(node: Client, models: list[dict[str, Any]]) -> None:
    if out.is_terminal:
        # Which node answered, for an operator with several; piped, stdout stays the
        # table alone (scripts read it).
        out.print(f"node {node.node_id or '?'} at {node.url}", style="dim", markup=False,
                  highlight=False)
    if not models:
        say("no models")
        return
    print_table(lambda width: status_table(models, width=width))
    for line in problem_lines(models):
        warn(line, style="red")
    for line in pull_lines(models):
        say(line)


def problem_lines(models: list[dict[str, Any]]) -> list[str]:
    """Under the table: why each failed model failed, and what a restarting one's last
    worker died of (a crash loop must not look like a model on its way up)."""
    lines = []
    for m in models:
        if m.get("error"):
            lines.append(f"{m['id']}: {m['error'].splitlines()[0]}")
        elif m.get("status") == "restarting" and m.get("last_error"):
            lines.append(f"{m['id']}: restarting after: {m['last_error'].splitlines()[0]}")
    return lines


def pull_lines(models: list[dict[str, Any]]) -> list[str]:
    """A line per download without a load (prefetch, `neuronctl pull`) still to finish,
    or failed: a first request to that model would otherwise wait for it."""
    lines = []
    for m in models:
        pull = m.get("pull") or {}
        state = pull.get("state")
        if state in ("queued", "downloading"):
            lines.append(f"{m['id']}: {pull.get('by')} download {state} "
                         f"{fmt_download(pull) if state == 'downloading' else ''}".rstrip())
        elif state == "failed":
            lines.append(f"{m['id']}: {pull.get('by')} download failed: {pull.get('error')}")
    return lines


def _clock(when: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


class EventLines:
    """`neuronctl events`' lines: time, model, what happened (in the API's status words),
    why; columns aligned on the widest id and transition seen so far. A download's
    progress is said only when its text changes (the node sends one a second)."""

    def __init__(self) -> None:
        self._width = 0
        self._what_width = 10
        self._progress: dict[str, str] = {}

    def _line(self, when: str, model: str, what: str, why: str = "") -> str:
        self._width = max(self._width, len(model))
        self._what_width = max(self._what_width, len(what))
        line = f"{when}  {model:<{self._width}}  {what:<{self._what_width}}  {why}"
        return line.rstrip()

    def lines(self, name: str, data: Any) -> list[str]:
        now = _clock()
        if name == "snapshot" or name == "resync":
            models = data.get("models") or []
            for m in models:
                self._width = max(self._width, len(str(m.get("id", ""))))
            head = [] if name == "snapshot" else [
                f"{now}  fell behind, {data.get('dropped')} events lost; the models now:"]
            # A failure with its reason (cli.md), as `status` says it.
            return head + [self._line(now, m["id"], m["status"],
                                      (str(m.get("error") or "").splitlines() or [""])[0])
                           for m in models] + ([] if models or head else [f"{now}  no models"])
        if name == "state":
            reason = (str(data.get("reason") or "").splitlines() or [""])[0]
            self._progress.pop(data["model"], None)
            return [self._line(_clock(data.get("time")), data["model"], _transition(data),
                               reason)]
        if name == "progress":
            download = data.get("download") or {}
            what = f"downloading {download.get('file') or ''}  {fmt_download(download)}"
            if self._progress.get(data["model"]) == what:
                return []
            self._progress[data["model"]] = what
            return [self._line(now, data["model"], what)]
        if name == "pull":
            said = data.get("error") or (fmt_download(data) if data.get("state") == "downloading"
                                         else data.get("path") or "")
            return [self._line(now, data["model"], f"pull ({data.get('by')}) {data.get('state')}",
                               str(said))]
        return [f"{now}  {name}  {json.dumps(data)}"]


def _event_lines(name: str, data: Any) -> list[str]:
    """One event's lines, on their own (no alignment with others)."""
    return EventLines().lines(name, data)


def _transition(data: dict[str, Any]) -> str:
    """In the API's words (`loaded → restarting`); a step within one status is that
    status alone (`loading`): the finer states are the journal's, not the API's."""
    try:
        said = journal_transition(WorkerState(data["from"]), WorkerState(data["to"]))
    except (KeyError, ValueError):  # a newer daemon's state: show what it sent
        return f"{data.get('from')} → {data.get('to')}"
    return said.split(":", 1)[0] if ": " in said else said.replace(" -> ", " → ")


STARTING_POLL_S = 1.0


def _follow(node: Client, show: Callable[[str, Any], None],
            while_starting: Callable[[str], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> NoReturn:
    """Call `show(event, data)` for each event until the stream ends: Ctrl-C exits 0
    quietly, a daemon that goes away (or ends the stream: it is stopping) exits 1. With
    `while_starting`, a daemon still activating is waited for (told what it says each
    time) rather than an error."""
    while True:
        try:
            for name, data in node.events():
                show(name, data)
        except KeyboardInterrupt:
            raise typer.Exit(0) from None
        except BrokenPipeError:  # `neuronctl events | head`: the reader left
            # Python's own flush at exit would complain about the closed pipe.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except DaemonNotRunning as exc:
            if while_starting is None or exc.starting is None:
                fail(str(exc))
            while_starting(str(exc))
            try:
                sleep(STARTING_POLL_S)
            except KeyboardInterrupt:
                raise typer.Exit(0) from None
            continue
        except ApiError as exc:
            fail(str(exc))
        fail(f"the daemon at {node.url} ended the stream (it is stopping)")


def events(
    json_: Annotated[
        bool, typer.Option("--json", help="One JSON object per line, with its `event`.")
    ] = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print every model state change as it happens, the models as they are first;
    Ctrl-C ends it."""
    printer = EventLines()

    def show(name: str, data: Any) -> None:
        if json_:
            lines = [json.dumps({"event": name, **data} if isinstance(data, dict)
                                else {"event": name, "data": data})]
        else:
            lines = printer.lines(name, data)
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()

    try:
        _follow(client(url, config), show)
    except KeyboardInterrupt:  # before the stream was open
        raise typer.Exit(0) from None


# A transition after which pid, port, error or listing differ: the list is read again.
_REREAD_AFTER = frozenset({"ready", "failed", "stopped"})


def _apply_state(models: list[dict[str, Any]], event: dict[str, Any],
                 node: Client) -> list[dict[str, Any]]:
    if event["to"] in _REREAD_AFTER:
        with contextlib.suppress(ApiError, DaemonNotRunning):
            return node.models()
    for m in models:
        if m["id"] == event["model"]:
            m["status"] = event["status"]
            if event["to"] != "downloading":
                m["download"] = None
            return models
    return [*models, {"id": event["model"], "status": event["status"]}]


def _watch_view(models: list[dict[str, Any]] | None, node: Client) -> RenderableType:
    if models is None:
        return Text("connecting...")
    # Which node this is (several may be watched side by side), and that the view is live.
    title = Text(f"node {node.node_id or '?'} at {node.url}  {_clock()}", style="dim")
    if not models:
        return Group(title, Text("no models"))
    now = time.time()
    # Uptime goes on between events: from `since`, at each redraw.
    shown = [{**m, "uptime_s": now - m["since"]} if m.get("uptime_s") is not None
             and m.get("since") else m for m in models]
    errors = [Text(line, style="red") for line in problem_lines(models)]
    return Group(title, status_table(shown, width=out.width), *errors)


def _watch_status(node: Client) -> NoReturn:
    """`status --watch`: the table kept up to date from the event stream. Rich's refresh
    thread redraws it 4 times a second; each event only changes what it will draw."""
    from rich.live import Live

    models: list[dict[str, Any]] | None = None
    starting: str | None = None  # what an activating daemon says, until its stream opens

    def waiting(said: str) -> None:
        nonlocal starting
        starting = said

    def show(name: str, data: Any) -> None:
        nonlocal models, starting
        starting = None
        if name == "snapshot":
            models = list(data["models"])
        elif name == "state":
            models = _apply_state(models or [], data, node)
        elif name == "progress":
            for m in models or []:
                if m["id"] == data["model"]:
                    m["download"] = data["download"]

    with Live(console=out, refresh_per_second=4,
              get_renderable=lambda: Text(starting) if starting and models is None
              else _watch_view(models, node)):
        try:
            _follow(node, show, waiting)
        except KeyboardInterrupt:  # before the stream was open
            raise typer.Exit(0) from None
