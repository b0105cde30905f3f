"""The files stage's local half: a `path` checked before a worker is started on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neuronctl.config import ModelSpec
from neuronctl.models.files import check_model_file, local_file
from neuronctl.models.hub import ResolveError


def test_local_path(tmp_path: Path) -> None:
    with pytest.raises(ResolveError,
                       match=f"model file not found or not readable: {tmp_path}/x.gguf"):
        local_file(ModelSpec("m", path=tmp_path / "x.gguf"))
    first = tmp_path / "big-00001-of-00002.gguf"
    first.write_bytes(b"GGUF")
    with pytest.raises(ResolveError,
                       match=r"model file not found or not readable: .*big-00002-of-00002"):
        local_file(ModelSpec("m", path=first))  # every part of a split model must be there
    (tmp_path / "big-00002-of-00002.gguf").write_bytes(b"GGUF")
    resolved = local_file(ModelSpec("m", path=first))
    assert resolved.path == first
    assert [p.name for p in resolved.parts] == [first.name, "big-00002-of-00002.gguf"]


def test_what_is_not_a_gguf_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(ResolveError, match="model path is a directory, not a GGUF file"):
        check_model_file(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo")  # opened without blocking: nobody ever writes to it
    with pytest.raises(ResolveError, match=r"model path is not a regular file \(a device"):
        check_model_file(tmp_path / "fifo")
    (tmp_path / "text").write_text("root:x:0:0")
    with pytest.raises(ResolveError, match=r"not a GGUF file \(no GGUF magic\)") as info:
        check_model_file(tmp_path / "text")
    assert "x:0:0" not in str(info.value)  # never the bytes it read
    (tmp_path / "link.gguf").symlink_to(tmp_path / "real.gguf")  # a cache's layout
    (tmp_path / "real.gguf").write_bytes(b"GGUF")
    check_model_file(tmp_path / "link.gguf")
