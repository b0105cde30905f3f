"""`neuronctl chat`: try a model the way `ollama run` does, through the node's `/v1`.

One prompt (an argument, or stdin when it is not a terminal) or an interactive loop that
keeps the conversation; every answer streamed as it is generated. It goes through the
node's router like any client (the API key, the queue, an on-demand load), never to the
worker's private port. The command is at the end; the conversation and the stream above
it are plain functions a test drives.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from .. import logfiles
from ..client import ApiError, Client, DaemonNotRunning
from ..errors import fail
from . import base
from .base import ConfigOpt, UrlOpt

# Long enough for an on-demand load and a queue wait (queue_timeout_s is 120 s by default).
DEFAULT_READ_TIMEOUT_S = 600.0
EMPTY_ANSWER = "(no text: the model ended its answer at once; a base model? try --raw)"
HELP = "/bye (or Ctrl-D) ends the chat, /clear forgets it, Ctrl-C stops an answer"


@dataclass
class ChatOptions:
    model: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    raw: bool = False  # /v1/completions: a base model continues the text, no chat template
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


@dataclass
class Conversation:
    options: ChatOptions
    messages: list[dict[str, str]] = field(default_factory=list)

    def request(self, prompt: str) -> tuple[str, dict[str, Any]]:
        """The route and body that ask for the answer to `prompt`, this conversation so far
        included."""
        o = self.options
        body: dict[str, Any] = {"model": o.model, "stream": True}
        if o.max_tokens is not None:
            body["max_tokens"] = o.max_tokens
        if o.temperature is not None:
            body["temperature"] = o.temperature
        if o.raw:
            return "/v1/completions", {**body, "prompt": prompt}
        system = [{"role": "system", "content": o.system}] if o.system else []
        turn = {"role": "user", "content": prompt}
        return "/v1/chat/completions", {**body, "messages": [*system, *self.messages, turn]}

    def answered(self, prompt: str, answer: str) -> None:
        if not self.options.raw:  # a raw completion has no turns to remember
            self.messages += [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": answer}]


def clean_text(text: str) -> str:
    """Text a worker can parse: bytes that were not UTF-8 (surrogate escapes from stdin or
    argv) become U+FFFD, where JSON would carry lone surrogates the worker refuses."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def answer_chunks(client: Client, conversation: Conversation, prompt: str) -> Iterator[str]:
    """The answer's text as the worker streams it. ApiError when the node refuses (the
    message is the node's: no such model, queue full, the model failed) and when the
    stream ends without `[DONE]`: a node or worker that died mid-answer cut it short."""
    path, body = conversation.request(prompt)
    for _, data in client.stream("POST", path, body, conversation.options.read_timeout_s):
        if data == "[DONE]":
            return
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("error"), dict):  # an error after the stream began
            raise ApiError(0, str(data["error"].get("message") or data["error"]))
        for choice in data.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                yield text
    raise ApiError(0, cut_off(client, conversation.options.model))


def cut_off(client: Client, model_id: str) -> str:
    """Why an answer ended without the stream's end. A worker that is still loaded ended
    it itself (a prompt longer than its context, say): its log says why, and that is
    what the operator needs, not "the node stopped"."""
    said = f"the answer was cut off: {client.url} ended the stream before it was complete"
    try:
        entry = next((m for m in client.models() if m.get("id") == model_id), None)
    except DaemonNotRunning:
        return f"{said} (the node stopped: it does not answer now)"
    except ApiError:
        return f"{said} (the node or its worker stopped)"
    if entry is None or entry.get("status") != "loaded":
        status = entry.get("status") if entry else "gone"
        return f"{said} (its worker stopped: {model_id} is {status} now)"
    why = None
    if entry.get("log_path"):
        with contextlib.suppress(OSError, logfiles.UnsafeLog):
            why, _ = logfiles.excerpt(Path(entry["log_path"]), 40, fallback=False)
    quoted = f"; its log says: {why}" if why else f" (neuronctl logs {model_id} shows why)"
    return f"{said}: {model_id} is still loaded, so its worker ended the answer{quoted}"


def loading_note(client: Client, model_id: str) -> str | None:
    """`loading MODEL on demand…` when the first request will wait for a load (the model is
    not loaded, or still loading), so a silent wait does not read as a hang."""
    try:
        entry = next((m for m in client.models() if m.get("id") == model_id), None)
    except (ApiError, DaemonNotRunning):
        return None  # the request itself will say what is wrong
    if entry is not None and entry.get("status") in ("unloaded", "loading", "downloading",
                                                      "restarting"):
        return f"loading {model_id} on demand…"
    return None


def stream_answer(client: Client, conversation: Conversation, prompt: str, out: TextIO) -> str:
    """Stream one answer to `out` and remember the turn; the answer's text. The line is
    ended whatever happens, so an error or a Ctrl-C (re-raised: the caller says it) never
    lands on the answer's line; a stopped answer is remembered as far as it came."""
    parts: list[str] = []
    try:
        for text in answer_chunks(client, conversation, prompt):
            parts.append(text)
            out.write(text)
            out.flush()
    except KeyboardInterrupt:
        conversation.answered(prompt, "".join(parts))
        raise
    else:
        if not parts:  # an empty line alone reads like a hang or a bug
            parts.append("")
            out.write(EMPTY_ANSWER if not conversation.options.raw else "(no text)")
    finally:
        if parts:  # a refusal before any text leaves stdout alone
            out.write("\n")
            out.flush()
    answer = "".join(parts)
    conversation.answered(prompt, answer)
    return answer


def interactive(client: Client, conversation: Conversation, read: Callable[[str], str],
                out: TextIO, err: TextIO) -> None:
    """The loop: read a prompt, stream its answer, until /bye or end of input. A refused
    prompt (queue full, the model failed) is said and the loop goes on; so does a Ctrl-C
    during an answer, which stops only that answer (closing the stream tells the node)."""
    while True:
        try:
            prompt = clean_text(read(">>> ")).strip()
        except EOFError:
            out.write("\n")
            return
        if not prompt:
            continue
        if prompt in ("/bye", "/exit", "/quit"):
            return
        if prompt == "/clear":
            conversation.messages.clear()
            out.write("(conversation cleared)\n")
            continue
        if prompt in ("/?", "/help"):
            out.write(HELP + "\n")
            continue
        try:
            stream_answer(client, conversation, prompt, out)
        except KeyboardInterrupt:
            err.write("(answer stopped)\n")
        except ApiError as exc:
            err.write(f"neuronctl: {exc.message}\n")
        err.flush()


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
    ] = DEFAULT_READ_TIMEOUT_S,
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
    options = ChatOptions(model=model_id, system=system, max_tokens=max_tokens,
                          temperature=temperature, raw=raw, read_timeout_s=timeout)
    node = base.client(url, config)
    conversation = Conversation(options)
    if prompt is None and not sys.stdin.isatty():
        # Bytes, decoded leniently: a prompt that is not UTF-8 is no reason for a traceback.
        prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
        prompt = prompt.rstrip("\n") if raw else prompt.strip()  # a raw prompt keeps its indent
        if not prompt.strip():
            fail("no prompt: stdin was empty", 2)
    note = loading_note(node, model_id)
    if note is not None:
        base.warn(note, style="dim")
    try:
        if prompt is not None:
            base.call(stream_answer, node, conversation, clean_text(prompt), sys.stdout)
            return
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then has line editing and history)
        base.warn(f"chatting with {model_id} at {node.url}/v1; {HELP}", style="dim")
        base.call(interactive, node, conversation, input, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # one prompt's answer stopped, or Ctrl-C at the >>> prompt
        sys.stdout.write("\n" if prompt is None else "")
        sys.stdout.flush()
        if prompt is not None:
            sys.stderr.write("neuronctl: answer stopped\n")
        raise typer.Exit(130) from None
