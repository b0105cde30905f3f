"""A misplaced option is told where it goes, not only that it is unknown."""

from __future__ import annotations

import subprocess

import pytest

from ..helpers import NEURONCTL, clean_env


def neuronctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NEURONCTL), *args], env=clean_env(), capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(("args", "error"), [
    (["status", "--key-file", "k"],
     "Error: No such option: --key-file (--key-file is an option of neuronctl itself: give "
     "it before the command, `neuronctl --key-file FILE status ...`)"),
    (["load", "tiny", "--key-file=k"],
     "Error: No such option: --key-file (--key-file is an option of neuronctl itself: give "
     "it before the command, `neuronctl --key-file FILE load ...`)"),
    (["fleet", "status", "--version"],
     "Error: No such option: --version (--version is an option of neuronctl itself: give "
     "it before the command, `neuronctl --version fleet ...`)"),
    (["--config", "c.toml", "reload"],
     "Error: No such option: --config (--config is an option of each command: give it "
     "after the command, `neuronctl reload --config FILE`)"),
    (["--url", ":1", "status"],
     "Error: No such option: --url (--url is an option of each command: give it after the "
     "command, `neuronctl status --url URL`)"),
    (["status", "--bogus"], "Error: No such option: --bogus"),
])
def test_a_misplaced_option_is_told_where_it_goes(args: list[str], error: str) -> None:
    result = neuronctl(*args)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == error
