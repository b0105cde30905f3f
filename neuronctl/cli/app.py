"""The `neuronctl` command line: typer for parsing, rich for output, the client for the rest."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.text import Text

from .. import __version__, logfiles
from ..client import ApiError, Client, DaemonNotRunning, connect, settings_for
from ..config import DEFAULT_CONFIG_PATH, ConfigError, config_from_env
from ..errors import EX_CONFIG
from ..states import WorkerState, journal_transition
from . import chat as chat_
from .fleet import app as fleet_app
from .formats import fmt_download, status_table

app = typer.Typer(
    help="Run and control llama.cpp model servers on this node.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    # Help strings hold "[default: ...]": shown as written, never read as rich markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(fleet_app, name="fleet")  # docs/fleet.md
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="NEURON_CONFIG",
                 help=f"Config file [default: $NEURON_CONFIG, else {DEFAULT_CONFIG_PATH}]"),
]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Daemon URL [default: $NEURON_URL, else the config's port]"),
]


def fail(message: str, code: int = 1) -> NoReturn:
    # Plain write, not rich: one line however narrow the terminal (or journal) is.
    sys.stderr.write(f"neuronctl: {message}\n")
    raise typer.Exit(code)


def _client(url: str | None, config: Path | None, timeout_s: float = 10.0) -> Client:
    try:
        client = connect(url, config, timeout_s)
    except ConfigError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except ValueError as exc:  # a --url or NEURON_URL that is no URL
        fail(f"--url: {exc}", 2)
    if client.note:
        sys.stderr.write(f"neuronctl: note: {client.note}\n")
    return client


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except DaemonNotRunning as exc:
        fail(str(exc))
    except ApiError as exc:
        fail(exc.message)


def _version(value: bool) -> None:
    if value:
        out.print(f"neuronctl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@app.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
def start(ctx: typer.Context) -> None:
    """Load the default models one by one, then serve the API until SIGTERM.

    Options: --config F, --port P, --log-level L (see `neuronctl start --help`).
    """
    # The console script runs `start` without typer (neuronctl/main.py); this command
    # lists it in --help, and hands over to that path for whoever calls this app directly:
    # the CLI never loads the daemon side itself.
    os.execv(sys.executable, [sys.executable, "-m", "neuronctl", "start", *ctx.args])


@app.command()
def status(
    json_: Annotated[bool, typer.Option("--json", help="Print the /models list as JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Keep the table up to date until Ctrl-C.")
    ] = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show every model on the node."""
    if watch:
        if json_:
            fail("--watch draws a table; for JSON as it happens, use neuronctl events --json")
        _watch_status(_client(url, config))
    models = _call(_client(url, config).models)
    if json_:
        print(json.dumps(models, indent=2))
        return
    if not models:
        out.print("no models")
        return
    if out.is_terminal or os.environ.get("COLUMNS"):
        out.print(status_table(models, width=out.width))
    else:  # piped (to grep, awk): every id whole, on its row's one line
        table = status_table(models)
        Console(width=out.measure(table, options=out.options.update(width=1 << 16)).maximum,
                force_terminal=False).print(table)
    for m in models:
        if m.get("error"):
            first = m["error"].splitlines()[0]
            err.print(
                f"{m['id']}: {first}", style="red", markup=False, highlight=False, soft_wrap=True
            )


# `ps`, as in `ollama ps` and `lms ps`: the same command, not listed twice in --help.
app.command("ps", hidden=True)(status)


def _clock(when: float | None = None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _event_lines(name: str, data: Any) -> list[str]:
    """One readable line per event (a snapshot: one per model)."""
    now = _clock()
    if name == "snapshot":
        models = data.get("models") or []
        return [f"{now}  {m['id']}  {m['status']}" for m in models] or [f"{now}  no models"]
    if name == "state":
        reason = (str(data.get("reason") or "").splitlines() or [""])[0]
        line = f"{_clock(data.get('time'))}  {data['model']}  {_transition(data)}"
        return [f"{line}  {reason}" if reason else line]
    if name == "progress":
        download = data.get("download") or {}
        file = download.get("file") or ""
        return [f"{now}  {data['model']}  downloading {file}  {fmt_download(download)}"]
    if name == "resync":
        return [f"{now}  fell behind, {data.get('dropped')} events lost; the models now:"]
    return [f"{now}  {name}  {json.dumps(data)}"]


def _transition(data: dict[str, Any]) -> str:
    """In the API's words, as the journal says it (`loaded → restarting`)."""
    try:
        said = journal_transition(WorkerState(data["from"]), WorkerState(data["to"]))
    except (KeyError, ValueError):  # a newer daemon's state: show what it sent
        return f"{data.get('from')} → {data.get('to')}"
    return said.replace(" -> ", " → ")


def _follow(client: Client, show: Callable[[str, Any], None]) -> NoReturn:
    """Call `show(event, data)` for each event until the stream ends: Ctrl-C exits 0
    quietly, a daemon that goes away (or ends the stream: it is stopping) exits 1."""
    try:
        for name, data in client.events():
            show(name, data)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except BrokenPipeError:  # `neuronctl events | head`: the reader left
        # Python's own flush at exit would complain about the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (DaemonNotRunning, ApiError) as exc:
        fail(str(exc))
    fail(f"the daemon at {client.url} ended the stream (it is stopping)")


@app.command()
def events(
    json_: Annotated[
        bool, typer.Option("--json", help="One JSON object per line, with its `event`.")
    ] = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print every model state change as it happens, the models as they are first;
    Ctrl-C ends it."""
    def show(name: str, data: Any) -> None:
        if json_:
            lines = [json.dumps({"event": name, **data} if isinstance(data, dict)
                                else {"event": name, "data": data})]
        else:
            lines = _event_lines(name, data)
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()

    try:
        _follow(_client(url, config), show)
    except KeyboardInterrupt:  # before the stream was open
        raise typer.Exit(0) from None


# A transition after which pid, port, error or listing differ: the list is read again.
_REREAD_AFTER = frozenset({"ready", "failed", "stopped"})


def _apply_state(models: list[dict[str, Any]], event: dict[str, Any],
                 client: Client) -> list[dict[str, Any]]:
    if event["to"] in _REREAD_AFTER:
        with contextlib.suppress(ApiError, DaemonNotRunning):
            return client.models()
    for m in models:
        if m["id"] == event["model"]:
            m["status"] = event["status"]
            if event["to"] != "downloading":
                m["download"] = None
            return models
    return [*models, {"id": event["model"], "status": event["status"]}]


def _watch_view(models: list[dict[str, Any]] | None) -> RenderableType:
    if models is None:
        return Text("connecting...")
    if not models:
        return Text("no models")
    now = time.time()
    # Uptime goes on between events: from `since`, at each redraw.
    shown = [{**m, "uptime_s": now - m["since"]} if m.get("uptime_s") is not None
             and m.get("since") else m for m in models]
    errors = [Text(f"{m['id']}: {m['error'].splitlines()[0]}", style="red")
              for m in models if m.get("error")]
    return Group(status_table(shown, width=out.width), *errors)


def _watch_status(client: Client) -> NoReturn:
    """`status --watch`: the table kept up to date from the event stream. Rich's refresh
    thread redraws it 4 times a second; each event only changes what it will draw."""
    from rich.live import Live

    models: list[dict[str, Any]] | None = None

    def show(name: str, data: Any) -> None:
        nonlocal models
        if name == "snapshot":
            models = list(data["models"])
        elif name == "state":
            models = _apply_state(models or [], data, client)
        elif name == "progress":
            for m in models or []:
                if m["id"] == data["model"]:
                    m["download"] = data["download"]

    with Live(console=out, refresh_per_second=4, get_renderable=lambda: _watch_view(models)):
        try:
            _follow(client, show)
        except KeyboardInterrupt:  # before the stream was open
            raise typer.Exit(0) from None


LOAD_POLL_S = 0.5
LOAD_POLL_TIMEOUT_S = 2.0


def _loading_what(client: Client, model_id: str) -> str | None:
    """What the spinner says while `model_id` loads: its download's bytes while it
    downloads; None when GET /models does not say (the spinner keeps its words)."""
    try:
        models = client.request("GET", "/models", timeout_s=LOAD_POLL_TIMEOUT_S)
    except (ApiError, DaemonNotRunning):
        return None
    for m in models if isinstance(models, list) else []:
        download = m.get("download")
        if m.get("id") == model_id and m.get("status") == "downloading" and download:
            file = escape(str(download.get("file") or "?"))
            return f"downloading {file} {fmt_download(download)}"
    return f"loading {escape(model_id)}"


@app.command()
def load(
    model_id: Annotated[str, typer.Argument(metavar="MODEL_ID", help="The id clients will use.")],
    path: Annotated[Path | None, typer.Option(help="A local GGUF file.")] = None,
    quant: Annotated[str | None, typer.Option(help="Quant that picks the GGUF.")] = None,
    harness: Annotated[str | None, typer.Option(help="Harness name.")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="Context size.")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(help="Layers on the GPU.")] = None,
    chat_format: Annotated[str | None, typer.Option(help="llama.cpp chat format.")] = None,
    device: Annotated[
        list[int] | None, typer.Option(help="GPU index; repeat for several.")
    ] = None,
    arg: Annotated[
        list[str] | None, typer.Option(help="Extra worker argument; repeat for several.")
    ] = None,
    ready_timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for the worker.")
    ] = None,
    ttl: Annotated[
        float | None, typer.Option(help="Unload after this many seconds without a request.")
    ] = None,
    file: Annotated[
        str | None, typer.Option(help="The GGUF file of its Hugging Face repo.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit of its Hugging Face repo.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Load even if the VRAM estimate says it does not fit.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds this command waits.")] = 1800.0,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Load a model and wait until it is ready. A catalogue model's id alone loads its
    entry in the config; options such as --ttl and --force override it."""
    spec: dict[str, Any] = {"model_id": model_id}
    options = {
        "path": str(path.resolve()) if path else None, "quant": quant, "harness": harness,
        "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers, "chat_format": chat_format,
        "devices": device or None, "args": arg or None, "ready_timeout_s": ready_timeout,
        "ttl_s": ttl, "file": file, "revision": revision, "force": force or None,
    }
    spec.update({k: v for k, v in options.items() if v is not None})
    client = _client(url, config)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["ok"] = client.load(spec, timeout)
        except (ApiError, DaemonNotRunning) as exc:
            result["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    thread.start()
    # The load call blocks until ready; meanwhile GET /models says what it is doing.
    doing, polled = f"loading {escape(model_id)}", started
    try:
        with err.status(doing, spinner="dots") as spinner:
            while thread.is_alive():
                thread.join(0.1)
                if time.monotonic() - polled >= LOAD_POLL_S:
                    doing = _loading_what(client, model_id) or doing
                    polled = time.monotonic()
                spinner.update(f"{doing} ({time.monotonic() - started:.0f}s)")
    except KeyboardInterrupt:
        # Only this command stops waiting: the load goes on in the daemon.
        err.print(f"interrupted: the daemon goes on loading {model_id}; "
                  f"`neuronctl status` shows it, `neuronctl unload {model_id}` stops it",
                  markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    exc = result.get("error")
    if isinstance(exc, DaemonNotRunning):
        fail(str(exc))
    if isinstance(exc, ApiError):
        # One line (STYLE: errors are one line) that already says what the worker said;
        # the log tail it carried (`detail`) is in the log.
        first = (exc.message.splitlines() or [""])[0]
        detail = isinstance(exc.body, dict) and exc.body.get("detail")
        hint = f" (neuronctl logs {model_id} shows the rest)" if detail else ""
        fail(f"{model_id}: {first}{hint}")
    # What clients should use: the node's OpenAI base URL and the model's name there (the
    # worker's own address changes at every restart and bypasses the API key).
    out.print(
        f"{model_id} loaded in {time.monotonic() - started:.1f}s:"
        f" model {model_id!r} at {client.url}/v1",
        markup=False,
        highlight=False,
        soft_wrap=True,  # one line, for grep, however long the id
    )


@app.command()
def unload(
    model_id: Annotated[
        str | None, typer.Argument(metavar="MODEL_ID", help="The model to stop.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every loaded model.")] = False,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stop a model's worker (or, with --all, every model's)."""
    if model_id is not None and all_:
        fail("give a MODEL_ID or --all, not both", 2)
    if model_id is None and not all_:
        fail("give a MODEL_ID, or --all", 2)
    client = _client(url, config, timeout_s=120.0)
    if model_id is not None:
        # A worker that ignores SIGTERM takes the node's stop_timeout_s: say what happens.
        with err.status(f"unloading {escape(model_id)}: SIGTERM to its worker, SIGKILL if it "
                        "does not exit in time", spinner="dots"):
            _call(client.unload, model_id)
        out.print(f"{model_id} unloaded", markup=False, highlight=False, soft_wrap=True)
        return
    loaded = [m["id"] for m in _call(client.models) if m["status"] != "unloaded"]
    if not loaded:
        out.print("no models loaded")
        return
    failed = False
    for each in loaded:  # one at a time: each unload answers once its worker is gone
        try:
            client.unload(each)
        except DaemonNotRunning as exc:
            fail(str(exc))
        except ApiError as exc:
            if exc.status != 404:  # a 404: gone meanwhile (idled out, or unloaded by another)
                failed = True
                err.print(f"{each}: {exc.message}", style="red", markup=False,
                          highlight=False, soft_wrap=True)
                continue
        out.print(f"{each} unloaded", markup=False, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def reload(
    timeout: Annotated[float, typer.Option(help="Seconds this command waits.")] = 1800.0,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Re-read the daemon's config: load new default models, unload removed ones, reload
    changed ones (the same as `systemctl reload neuron`)."""
    result = _call(_client(url, config, timeout_s=timeout).request, "POST", "/reload")
    out.print(result.get("summary", "reloaded"), markup=False, highlight=False)
    if result.get("failed"):
        for model_id, message in result["failed"].items():
            first = str(message).splitlines()[0] if message else ""
            err.print(f"{model_id}: {first}", style="red", markup=False, highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def chat(
    model_id: Annotated[str, typer.Argument(metavar="MODEL_ID", help="The model to talk to.")],
    prompt: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", help="One prompt; without it, stdin when piped, "
                                              "else an interactive chat (/bye ends it)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens per answer.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="A plain completion of PROMPT (base models), no "
                                         "chat template.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the next token (an on-demand load "
                                 "included).")
    ] = chat_.DEFAULT_READ_TIMEOUT_S,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Chat with a model through the node's /v1, answers streamed (like `ollama run`)."""
    if not (math.isfinite(timeout) and timeout > 0):
        fail(f"--timeout: must be a positive number of seconds, got {timeout:g}", 2)
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens: must be at least 1, got {max_tokens}", 2)
    if raw and system is not None:
        fail("--system needs a chat; --raw is a plain completion of the prompt", 2)
    options = chat_.ChatOptions(model=model_id, system=system, max_tokens=max_tokens,
                                temperature=temperature, raw=raw, read_timeout_s=timeout)
    client = _client(url, config)
    conversation = chat_.Conversation(options)
    if prompt is None and not sys.stdin.isatty():
        # Bytes, decoded leniently: a prompt that is not UTF-8 is no reason for a traceback.
        prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
        prompt = prompt.rstrip("\n") if raw else prompt.strip()  # a raw prompt keeps its indent
        if not prompt.strip():
            fail("no prompt: stdin was empty", 2)
    try:
        if prompt is not None:
            _call(chat_.say, client, conversation, chat_.clean_text(prompt), sys.stdout)
            return
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then has line editing and history)
        err.print(f"chatting with {model_id} at {client.url}/v1; {chat_.HELP}",
                  markup=False, highlight=False, style="dim", soft_wrap=True)
        _call(chat_.interactive, client, conversation, input, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # one prompt's answer stopped, or Ctrl-C at the >>> prompt
        sys.stdout.write("\n" if prompt is None else "")
        sys.stdout.flush()
        if prompt is not None:
            sys.stderr.write("neuronctl: answer stopped\n")
        raise typer.Exit(130) from None


@app.command()
def logs(
    model_id: Annotated[
        str, typer.Argument(metavar="MODEL_ID", help="The model whose log to show.")
    ],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show.")] = 50,
    previous: Annotated[
        bool, typer.Option("--previous", "-p", help="The log of the start before this one.")
    ] = False,
    log_dir: Annotated[
        Path | None, typer.Option(help="Log directory [default: the daemon's, else the "
                                       "config's log_dir].")
    ] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Print a model's log file; works whether or not the daemon runs."""
    path = logfiles.log_path(log_dir, model_id) if log_dir is not None else \
        _log_path_from_daemon(url, config, model_id)
    if path is None:
        try:
            settings = settings_for(config)
            log_dir = settings.log_dir if settings else config_from_env().log_dir
        except ConfigError as exc:
            fail(f"config error: {exc}", EX_CONFIG)
        path = logfiles.log_path(log_dir, model_id)
    if previous:
        path = logfiles.previous_path(path)
    try:
        tail = logfiles.read_tail(path, lines)
    except FileNotFoundError:
        which = "previous log" if previous else "log"
        fail(f"no {which} for {model_id} at {path}")
    except logfiles.UnsafeLog as exc:  # a symlink or a FIFO planted in log_dir
        fail(f"{path} {exc.strerror}")
    for line in tail:
        print(line)
    if follow:
        sys.stdout.flush()
        try:
            for chunk in logfiles.follow(path):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        except logfiles.UnsafeLog as exc:
            fail(f"{path} {exc.strerror}")


def _log_path_from_daemon(url: str | None, config: Path | None, model_id: str) -> Path | None:
    """Where the daemon writes this model's log (`log_path` in /models): the daemon knows,
    whatever config this shell finds. None when it does not answer or does not know."""
    try:
        models = connect(url, config, timeout_s=3.0).models()
    except (ApiError, DaemonNotRunning, ConfigError, ValueError):
        return None
    for model in models:
        if model.get("id") == model_id and model.get("log_path"):
            return Path(model["log_path"])
    return None


def main() -> None:
    app()
