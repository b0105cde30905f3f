"""`neuronctl logs`: a model's log file, read where the daemon writes it (or, when it does
not answer, where the config says), so it works whether or not the daemon runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import logfiles
from ..client import ApiError, DaemonNotRunning, KeyFileError, connect, settings_for
from ..config import ConfigError, config_from_env
from ..errors import EX_CONFIG, fail
from .base import ConfigOpt, UrlOpt


def logs(
    model_id: Annotated[
        str, typer.Argument(metavar="MODEL_ID", help="The model whose log to show.")
    ],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    lines: Annotated[int, typer.Option(
        "--lines", "-n", metavar="N", help="Lines to show.")] = logfiles.DEFAULT_TAIL_LINES,
    previous: Annotated[
        bool, typer.Option("--previous", "-p", help="The log of the start before this one.")
    ] = False,
    log_dir: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Log directory.",
                                  show_default="the daemon's, else the config's log_dir")
    ] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Print a model's log file; works whether or not the daemon runs."""
    known = _model_from_daemon(url, config, model_id) if log_dir is None else None
    path = logfiles.log_path(log_dir, model_id) if log_dir is not None else \
        Path(known["log_path"]) if known and known.get("log_path") else None
    if path is None:
        try:
            problems: list[str] = []
            settings = settings_for(config, problems)
            for problem in problems:
                sys.stderr.write(f"neuronctl: warning: {problem}\n")
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
        if previous and known and known.get("last_error"):
            # Restarts that failed before spawning (the model file is gone) start no new
            # log: the crash is in the current one.
            fail(f"no {which} for {model_id} at {path}: no worker started after the one "
                 f"in its current log (`neuronctl logs {model_id}`); its last error: "
                 f"{str(known['last_error']).splitlines()[0]}")
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


def _model_from_daemon(url: str | None, config: Path | None,
                       model_id: str) -> dict[str, Any] | None:
    """The model's `/models` entry: the daemon knows where it writes its log (`log_path`),
    whatever config this shell finds, and its last error. None when it does not answer or
    does not know it."""
    try:
        models = connect(url, config, timeout_s=3.0).models()
    except (ApiError, DaemonNotRunning, ConfigError, KeyFileError, ValueError):
        return None
    for model in models:
        if model.get("id") == model_id:
            return model
    return None
