"""The store's child process: whose ids it runs with when the CLI is root (the daemon's
user, who owns state_dir), and how its JSON lines come back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from neuronctl.cli import storechild
from neuronctl.config import NeuronConfig


def test_owner_of_a_path_not_made_yet_is_its_nearest_folders(tmp_path: Path) -> None:
    st = tmp_path.stat()
    assert storechild.owner_of(tmp_path / "not" / "yet") == (st.st_uid, st.st_gid)


def test_root_runs_the_child_as_the_owner_of_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = NeuronConfig(state_dir=state)
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)
        assert storechild.run_as(config) == (65534, 65534)
        os.chown(state, 0, 0)
        assert storechild.run_as(config) is None  # root's own state_dir: stays root
    assert storechild.run_as(config, euid=1000) is None  # not root: nothing to change


def test_the_child_is_started_with_those_ids(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids reach Popen (the interpreter under test lives where another user may not run
    it, so the child itself runs as we are)."""
    seen: dict[str, Any] = {}
    real = subprocess.Popen

    def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        seen.update(kw)
        for key in ("user", "group", "extra_groups"):
            kw.pop(key, None)
        return real(argv, **kw)

    monkeypatch.setattr(storechild.subprocess, "Popen", popen)
    config = tmp_path / "neuron.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    lines = list(storechild.run("ls", [], config, (65534, 65534)))
    assert (seen["user"], seen["group"], seen["extra_groups"]) == (65534, 65534, [])
    assert seen["env"]["NEURONCTL_STORE_PARENT"] == str(os.getpid())
    assert lines[-1] == {"exit": 0} and lines[0]["models"] == []

