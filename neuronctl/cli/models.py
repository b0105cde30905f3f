"""`neuronctl load`, `unload` and `reload`: the commands that change which models run.
`load` waits for the model behind a spinner that says what the node is doing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from ..client import ApiError, Client, DaemonNotRunning
from ..errors import fail
from .base import ConfigOpt, UrlOpt, call, client, err, say, warn
from .formats import fmt_download

T = TypeVar("T")

LOAD_POLL_S = 0.5
LOAD_POLL_TIMEOUT_S = 2.0


def _loading_what(node: Client, model_id: str) -> str | None:
    """What the spinner says while `model_id` loads: its download's bytes while it
    downloads; None when GET /models does not say (the spinner keeps its words)."""
    try:
        models = node.request("GET", "/models", timeout_s=LOAD_POLL_TIMEOUT_S)
    except (ApiError, DaemonNotRunning):
        return None
    for m in models if isinstance(models, list) else []:
        download = m.get("download")
        if m.get("id") == model_id and m.get("status") == "downloading" and download:
            file = escape(str(download.get("file") or "?"))
            return f"downloading {file} {fmt_download(download)}"
    return f"loading {escape(model_id)}"


def _wait_with_spinner(work: Callable[[], T], describe: Callable[[], str | None],
                       doing: str) -> T:
    """`work()`'s result (or what it raised), a spinner on stderr meanwhile: `doing` (rich
    markup), then what `describe()` says every LOAD_POLL_S (its last words while it says
    None), and the seconds so far. `work` runs in a daemon thread: a Ctrl-C (raised on)
    stops only the wait."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = polled = time.monotonic()
    with err.status(doing, spinner="dots") as spinner:
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if time.monotonic() - polled >= LOAD_POLL_S:
                doing = describe() or doing
                polled = time.monotonic()
            spinner.update(f"{doing} ({time.monotonic() - started:.0f}s)")
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


def load(
    model_id: Annotated[str | None, typer.Argument(
        metavar="MODEL_ID", help="The id clients will use (a catalogue id alone loads its "
        "entry).", show_default=False)] = None,
    defaults: Annotated[bool, typer.Option(
        "--defaults", help="Load every default model that is not loaded (after `unload "
        "--all`, say).", rich_help_panel="What")] = False,
    path: Annotated[Path | None, typer.Option(
        metavar="FILE", help="A local GGUF file.", rich_help_panel="Source")] = None,
    repo: Annotated[str | None, typer.Option(
        metavar="ORG/NAME", help="Hugging Face repo to fetch the GGUF from.",
        rich_help_panel="Source")] = None,
    quant: Annotated[str | None, typer.Option(
        metavar="QUANT", help="Quant that picks the GGUF in the repo (Q4_K_M).",
        rich_help_panel="Source")] = None,
    file: Annotated[str | None, typer.Option(
        metavar="NAME", help="The GGUF file of its Hugging Face repo.",
        rich_help_panel="Source")] = None,
    revision: Annotated[str | None, typer.Option(
        metavar="REV", help="Branch, tag or commit of its Hugging Face repo.",
        rich_help_panel="Source")] = None,
    harness: Annotated[str | None, typer.Option(
        metavar="NAME", help="Harness: llama-cpp-python or llama-server.",
        rich_help_panel="Worker")] = None,
    n_ctx: Annotated[int | None, typer.Option(
        metavar="N", help="Context size.", rich_help_panel="Worker")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(
        metavar="N", help="Layers on the GPU.", rich_help_panel="Worker")] = None,
    device: Annotated[list[int] | None, typer.Option(
        metavar="GPU", help="GPU index; repeat for several.", rich_help_panel="Worker")] = None,
    tensor_split: Annotated[list[float] | None, typer.Option(
        metavar="SHARE", help="Share of the model per device; repeat, one per --device.",
        rich_help_panel="Worker")] = None,
    chat_format: Annotated[str | None, typer.Option(
        metavar="NAME", help="llama.cpp chat format.", rich_help_panel="Worker")] = None,
    arg: Annotated[list[str] | None, typer.Option(
        metavar="ARG", help="Extra worker argument; repeat for several.",
        rich_help_panel="Worker")] = None,
    parallel: Annotated[int | None, typer.Option(
        metavar="N", help="Requests served at once (llama-server's slots).",
        rich_help_panel="Worker")] = None,
    ready_timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Seconds to wait for the worker.",
        rich_help_panel="Worker")] = None,
    restart: Annotated[str | None, typer.Option(
        metavar="POLICY", help="Restart policy: always, on-failure or never.",
        rich_help_panel="Worker")] = None,
    max_restarts: Annotated[int | None, typer.Option(
        metavar="N", help="Restarts allowed within the node's restart window.",
        rich_help_panel="Worker")] = None,
    ttl: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="Unload after this many seconds without a request.",
        rich_help_panel="Serving")] = None,
    max_queue: Annotated[int | None, typer.Option(
        metavar="N", help="Requests that may wait for it.", rich_help_panel="Serving")] = None,
    queue_timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help="How long a request may wait for it.",
        rich_help_panel="Serving")] = None,
    pinned: Annotated[bool | None, typer.Option(
        "--pinned/--not-pinned", help="Never evicted to make room for another model.",
        show_default=False, rich_help_panel="Serving")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Load even if the memory estimate says it does not fit.",
        rich_help_panel="Serving")] = False,
    timeout: Annotated[float, typer.Option(
        metavar="SECONDS", help="Seconds this command waits.")] = 1800.0,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Load a model and wait until it is ready. A catalogue model's id alone loads its
    entry in the config; options such as --ttl and --force override it. An id outside the
    catalogue needs --path, or --repo/--quant/--file to fetch it from Hugging Face."""
    if defaults:
        if model_id is not None:
            fail("give a MODEL_ID or --defaults, not both", 2)
        _load_defaults(client(url, config), timeout)
        return
    if model_id is None:
        fail("give a MODEL_ID, or --defaults", 2)
    spec: dict[str, Any] = {"model_id": model_id}
    options = {
        # Absolute as typed (the daemon's cwd is not ours), symlinks kept: the messages
        # then name the path the operator knows.
        "path": os.path.abspath(path) if path else None, "repo": repo, "quant": quant,
        "harness": harness, "n_ctx": n_ctx, "n_gpu_layers": n_gpu_layers,
        "chat_format": chat_format, "devices": device or None,
        "tensor_split": tensor_split or None, "args": arg or None, "parallel": parallel,
        "ready_timeout_s": ready_timeout, "restart": restart, "max_restarts": max_restarts,
        "ttl_s": ttl, "max_queue": max_queue, "queue_timeout_s": queue_timeout,
        "pinned": pinned, "file": file, "revision": revision, "force": force or None,
    }
    spec.update({k: v for k, v in options.items() if v is not None})
    node = client(url, config)
    say(_load_one(node, spec, timeout))


def _load_one(node: Client, spec: dict[str, Any], timeout: float) -> str:
    """Load `spec` behind the spinner; what happened, one line (or exit with why not)."""
    model_id = spec["model_id"]
    started = time.monotonic()
    try:
        # The load call blocks until ready; meanwhile GET /models says what it is doing.
        answer = _wait_with_spinner(lambda: node.load(spec, timeout),
                                    lambda: _loading_what(node, model_id),
                                    f"loading {escape(model_id)}")
    except KeyboardInterrupt:
        # Only this command stops waiting: the load goes on in the daemon.
        warn(f"interrupted: the daemon goes on loading {model_id}; "
             f"`neuronctl status` shows it, `neuronctl unload {model_id}` stops it")
        raise typer.Exit(130) from None
    except DaemonNotRunning as exc:
        fail(str(exc))
    except ApiError as exc:
        fail(load_error(model_id, exc))
    # What clients should use: the node's OpenAI base URL and the model's name there (the
    # worker's own address changes at every restart and bypasses the API key).
    where = f"model {model_id!r} at {node.url}/v1"
    if answer.get("already_loaded"):
        return f"{model_id} is already loaded: {where}"
    evicted = answer.get("evicted") or []
    made_room = f" (unloaded {', '.join(evicted)} to make room)" if evicted else ""
    return f"{model_id} loaded in {time.monotonic() - started:.1f}s{made_room}: {where}"


def load_error(model_id: str, exc: ApiError) -> str:
    """A refused load in one line (STYLE: errors are one line) that already says what the
    worker said; the log tail it carried (`detail`) is in the log. The id leads it unless
    the message names it already."""
    first = (exc.message.splitlines() or [""])[0]
    detail = isinstance(exc.body, dict) and exc.body.get("detail")
    hint = f" (neuronctl logs {model_id} shows the rest)" if detail else ""
    named = first.startswith(f"{model_id} ") or f"{model_id!r}" in first
    return f"{first}{hint}" if named else f"{model_id}: {first}{hint}"


def _load_defaults(node: Client, timeout: float) -> None:
    """`load --defaults`: each default model that is not loaded, one at a time (as the
    node loads them at start); exit 1 when one failed, after trying the others."""
    listed = call(node.models)
    todo = [m["id"] for m in listed if m.get("default") and m.get("status") != "loaded"]
    if not todo:
        say("every default model is loaded" if any(m.get("default") for m in listed)
            else "this node has no default models")
        return
    failed = False
    for model_id in todo:
        try:
            answer = node.load({"model_id": model_id}, timeout)
        except DaemonNotRunning as exc:
            fail(str(exc))
        except ApiError as exc:
            failed = True
            warn(load_error(model_id, exc), style="red")
            continue
        say(f"{model_id} is already loaded" if answer.get("already_loaded")
            else f"{model_id} loaded")
    if failed:
        raise typer.Exit(1)


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
    node = client(url, config, timeout_s=120.0)
    if model_id is not None:
        # A worker that ignores SIGTERM takes the node's stop_timeout_s: say what happens.
        with err.status(f"unloading {escape(model_id)}: SIGTERM to its worker, SIGKILL if it "
                        "does not exit in time", spinner="dots"):
            call(node.unload, model_id)
        say(f"{model_id} unloaded")
        return
    loaded = [m["id"] for m in call(node.models) if m["status"] != "unloaded"]
    if not loaded:
        say("no models loaded")
        return
    failed = False
    for each in loaded:  # one at a time: each unload answers once its worker is gone
        try:
            node.unload(each)
        except DaemonNotRunning as exc:
            fail(str(exc))
        except ApiError as exc:
            if exc.status != 404:  # a 404: gone meanwhile (idled out, or unloaded by another)
                failed = True
                warn(f"{each}: {exc.message}", style="red")
                continue
        say(f"{each} unloaded")
    if failed:
        raise typer.Exit(1)


def reload(
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Say what a reload would change; change nothing.")] = False,
    timeout: Annotated[float, typer.Option(
        metavar="SECONDS", help="Seconds this command waits.")] = 1800.0,
    url: UrlOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Re-read the daemon's config: load new default models, unload removed ones, reload
    changed ones, loaded catalogue models included (the same as `systemctl reload
    neuron`); each model it touches is named with why."""
    path = "/reload?dry_run=1" if dry_run else "/reload"
    result = call(client(url, config, timeout_s=timeout).request, "POST", path)
    say(result.get("summary", "reloaded"))
    for line in result.get("details") or []:
        say(f"  {line}")
    if result.get("failed"):
        for model_id, message in result["failed"].items():
            first = str(message).splitlines()[0] if message else ""
            warn(f"{model_id}: {first}", style="red")
        raise typer.Exit(1)
