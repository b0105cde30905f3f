"""The store's child (`python -m neuronctl.models.storetool`): its answers are JSON lines,
a failure one line with a code, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuronctl.models import store, storetool

from ..gpu_fakes import lay_out_hf_cache


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cache = tmp_path / "hf"
    lay_out_hf_cache(cache, "org/m-GGUF", {"m-Q8_0.gguf": b"GGUF"})
    config = tmp_path / "neuron.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[harness.llama-cpp-python]\n'
                      f'hf_cache = "{cache}"\n')
    return config


def answers(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_cache_this_user_may_not_change_is_one_line(
        config: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """rm as the daemon's user of files root made: the reason, not a traceback."""
    def refused(models: object) -> store.Removal:
        raise PermissionError(13, "Permission denied", "/var/lib/neuron/hf/blobs/abc")

    monkeypatch.setattr(storetool.store, "remove", refused)
    assert storetool.main(["rm", "org/m-GGUF", "--config", str(config)]) == 1
    assert answers(capsys) == [{"error": "rm: cannot use /var/lib/neuron/hf/blobs/abc: "
                                         "Permission denied", "code": "os_error"}]


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["show"], "bad_arguments", "show takes one model"),
    (["show", "nonsense"], "bad_model", "neither a model of the config"),
    (["rm", "org/other-GGUF"], "not_cached", "nothing of it in the cache"),
    (["pull"], "nothing_to_pull", "nothing to pull"),
])
def test_bad_requests_answer_one_line(config: Path, capsys: pytest.CaptureFixture[str],
                                      argv: list[str], code: str, says: str) -> None:
    assert storetool.main([*argv, "--config", str(config)]) != 0
    (answer,) = answers(capsys)
    assert answer["code"] == code and says in str(answer["error"])


def test_a_bad_config_names_the_key(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text("prefetch = 3\n")
    assert storetool.main(["ls", "--config", str(config)]) == 78
    (answer,) = answers(capsys)
    assert "prefetch" in str(answer["error"]) and answer["code"] == "invalid_config"
