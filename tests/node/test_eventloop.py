"""The daemon's event loop (node/eventloop.py): uvloop where it imports, as configured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from neuronctl.errors import EX_CONFIG
from neuronctl.node import eventloop

from ..helpers import clean_env, free_port

NEURONCTL = str(Path(sys.executable).with_name("neuronctl"))


async def loop_name() -> str:
    return eventloop.name()


@pytest.mark.parametrize(("choice", "expected"),
                         [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_config_chooses_the_loop(choice: str, expected: str) -> None:
    assert eventloop.runner(choice)(loop_name()) == expected


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert eventloop.runner("auto") is asyncio.run
    with pytest.raises(eventloop.LoopUnavailable, match='"uvloop", but uvloop cannot be imported'):
        eventloop.runner("uvloop")
    monkeypatch.undo()
    assert eventloop.runner("auto") is uvloop.run


def test_start_refuses_uvloop_where_it_is_missing(tmp_path: Path) -> None:
    """A config error naming the key, before anything is bound or loaded."""
    hidden = tmp_path / "hide"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('not here')\n")
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {free_port()}\nlog_dir = "log"\n'
                      f'state_dir = "state"\nevent_loop = "uvloop"\n')
    done = subprocess.run([NEURONCTL, "start", "--config", str(config)],
                          env=clean_env(PYTHONPATH=str(hidden)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EX_CONFIG, done.stderr
    assert (f'config error: {config}: event_loop: "uvloop", but uvloop cannot be imported '
            "(not here)") in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()
