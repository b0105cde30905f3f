"""Per-model log files: safe names, the start header, reading the tail."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from neuronctl.logfiles import (
    excerpt,
    log_path,
    open_for_worker,
    safe_name,
    tail_lines,
    write_pid_line,
)

HOSTILE_IDS = [
    "../../etc/passwd",
    "/abs",
    "/",
    "a\x00b",
    "..",
    ".",
    "...",
    ".hidden",
    "./x",
    "a/../../b",
    "x" * 1000,
    "é" * 300,
    "模型/量子化",
    "llama 🦙",
    "a\\b",
    "a\nb",
    "\udc80",
    "",
    " ",
    "-",
]


def test_hugging_face_style_id() -> None:
    assert safe_name("Qwen/Qwen3-0.6B-GGUF") == "Qwen--Qwen3-0.6B-GGUF"


def test_log_path_is_in_the_log_dir(tmp_path: Path) -> None:
    assert log_path(tmp_path, "Qwen/Qwen3-0.6B-GGUF") == tmp_path / "Qwen--Qwen3-0.6B-GGUF.log"


@pytest.mark.parametrize("model_id", ["gemma-3-270m", "model_v1.2", "A.B-c_d"])
def test_plain_ids_are_kept(model_id: str) -> None:
    assert safe_name(model_id) == model_id


@pytest.mark.parametrize("model_id", HOSTILE_IDS, ids=lambda m: repr(m[:20]))
def test_hostile_ids_give_a_plain_file_name(tmp_path: Path, model_id: str) -> None:
    path = log_path(tmp_path, model_id)
    name = path.name
    assert path.parent == tmp_path
    assert "/" not in name
    assert "\x00" not in name
    assert not name.startswith(".")
    assert name not in ("", ".", "..", ".log")
    assert len(name) <= 200
    assert name.isprintable()
    assert name == f"{safe_name(model_id)}.log"  # the stem is safe_name's, every call
    # Really creating it leaves exactly one file, directly in the log dir.
    os.close(open_for_worker(path, ["true"]))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert path.resolve().parent == tmp_path.resolve()


def test_ids_that_mangle_alike_get_distinct_names() -> None:
    ids = [
        "a b", "a?b", "a_b", "a\x00b", "a\nb",
        ".hidden", "hidden", "..hidden",
        "x" * 1000, "x" * 1001, "x" * 200 + "a", "x" * 200 + "b",
        "模型", "型模", "ab", "éb",
        "..", ".", "...", "",
    ]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids), dict(zip(ids, names, strict=True))


def test_slash_and_double_dash_ids_get_distinct_names() -> None:
    assert safe_name("Qwen/Qwen3-0.6B-GGUF") != safe_name("Qwen--Qwen3-0.6B-GGUF")


# --- open_for_worker ------------------------------------------------------------------------


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_open_for_worker_writes_a_header_with_the_command(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "m.log"  # parents are created
    command = ["/usr/bin/python3", "-c", "print('hi there')"]
    fd = open_for_worker(path, command)
    try:
        write_pid_line(fd, 4242)
        os.write(fd, b"worker output\n")
    finally:
        os.close(fd)
    lines = read(path).splitlines()
    header = [ln for ln in lines if ln.startswith("===")]
    assert header[0].endswith(f"neuronctl starting: {shlex.join(command)}")
    assert header[1] == "=== worker pid 4242"
    assert lines[-1] == "worker output"


def test_open_for_worker_appends(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("older run\n", encoding="utf-8")
    for cmd in (["first"], ["second"]):
        os.close(open_for_worker(path, cmd))
    text = read(path)
    assert text.startswith("older run\n")
    starts = [ln for ln in text.splitlines() if "neuronctl starting:" in ln]
    assert [ln.rsplit(" ", 1)[1] for ln in starts] == ["first", "second"]


def test_open_for_worker_fd_is_append_only(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    fd = open_for_worker(path, ["x"])
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"tail\n")
    finally:
        os.close(fd)
    assert read(path).endswith("tail\n")


# --- tail_lines -----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")


def test_tail_returns_the_last_n_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    write_lines(path, [f"line {i}" for i in range(100)])
    assert tail_lines(path, 3) == ["line 97", "line 98", "line 99"]
    assert tail_lines(path, 1) == ["line 99"]
    assert tail_lines(path, 0) == []
    assert tail_lines(path, 1000) == [f"line {i}" for i in range(100)]


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert tail_lines(tmp_path / "absent.log", 10) == []


def test_tail_of_an_empty_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.touch()
    assert tail_lines(path, 10) == []


def test_tail_keeps_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_text("a\nb\npartial", encoding="utf-8")
    assert tail_lines(path, 2) == ["b", "partial"]


def test_tail_of_a_file_larger_than_the_window(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    write_lines(path, [f"line {i:06d}" for i in range(20000)])  # ~240 kB
    assert path.stat().st_size > 64 * 1024
    assert tail_lines(path, 5) == [f"line {i:06d}" for i in range(19995, 20000)]
    assert tail_lines(path, 5, max_bytes=100) == [f"line {i:06d}" for i in range(19995, 20000)]


def test_tail_never_returns_a_line_cut_by_the_window(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    lines = [f"{i:04d}" + "x" * 995 for i in range(500)]  # 1000-char lines, ~500 kB
    write_lines(path, lines)
    got = tail_lines(path, 400)  # more lines than the window holds
    assert got
    assert got == lines[-len(got) :]


def test_tail_survives_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    path.write_bytes(b"ok\n\xff\xfe broken\nlast\n")
    got = tail_lines(path, 3)
    assert got[0] == "ok"
    assert got[-1] == "last"
    assert "broken" in got[1]


def test_rotate_keeps_the_configured_number_of_previous_logs(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    for start in range(5):
        fd = open_for_worker(path, ["worker", f"start-{start}"], keep=2)
        os.close(fd)
    assert "start-4" in path.read_text()
    assert "start-3" in (tmp_path / "m.log.1").read_text()
    assert "start-2" in (tmp_path / "m.log.2").read_text()
    assert not (tmp_path / "m.log.3").exists()


@pytest.mark.timeout(20)
def test_follow_moves_on_to_the_new_file_after_a_rotation(tmp_path: Path) -> None:
    from neuronctl.logfiles import follow, rotate

    path = tmp_path / "m.log"
    path.write_text("the old start\n")
    lines = follow(path, poll_s=0.01, from_start=True)
    assert next(lines) == "the old start\n"
    rotate(path, keep=1)
    path.write_text("the new start\n")
    assert next(lines) == "the new start\n"  # not stuck on the rotated-away file
    lines.close()


def test_the_headline_is_the_line_that_says_why(tmp_path: Path) -> None:
    """The root cause (memory for the KV cache) over the generic line after it."""
    log = tmp_path / "huge.log"
    log.write_text(
        "=== 2026-12-05 neuronctl starting: python worker.py\n"
        "llama_model_loader: loaded meta data\n"
        "ggml_aligned_malloc: insufficient memory (attempted to allocate 292968.75 MB)\n"
        "llama_kv_cache_init: failed to allocate buffer for kv cache\n"
        "Traceback (most recent call last):\n"
        "ValueError: Failed to create llama_context\n", encoding="utf-8")
    headline, _ = excerpt(log, 20)
    assert headline == ("ggml_aligned_malloc: insufficient memory (attempted to allocate "
                        "292968.75 MB)")


def test_a_fresh_log_starts_with_its_header_and_appended_starts_are_parted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.log"
    for _ in range(2):
        os.close(open_for_worker(path, ["worker", "--port", "1"], keep=0))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("=== ") and "neuronctl starting: worker --port 1" in lines[0]
    assert lines[1] == "" and lines[2].startswith("=== ")  # the second start, appended


def test_prune_logs_keeps_known_models_the_newest_others_and_what_it_did_not_write(
    tmp_path: Path,
) -> None:
    from neuronctl.logfiles import prune_logs, stamped

    def log(name: str, age_s: float, text: bytes | None = None) -> Path:
        path = tmp_path / name
        path.write_bytes(stamped("neuronctl starting: x") if text is None else text)
        os.utime(path, (1_000_000 - age_s, 1_000_000 - age_s))
        return path

    known = log("tiny.log", 900)  # a model the node knows: never removed, however old
    fresh = [log("new.log", 1), log("new.log.1", 2)]
    stale = [log("old.log", 50), log("old.log.1", 60), log("older.log", 70)]
    foreign = log("nginx.log", 99, b"127.0.0.1 - GET /\n")  # someone else's file
    other = log("notes.txt", 99)
    (tmp_path / "link.log").symlink_to(fresh[0])  # never followed, never removed
    another = log("other-node.log", 999)  # another node's, sharing log_dir: no candidate
    ran = {"tiny", "new", "old", "older", "nginx", "link"}  # what this daemon ran ad hoc
    removed = prune_logs(tmp_path, ran, {"tiny"}, keep_others=1)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in (known, *fresh, foreign, other, another))
    assert (tmp_path / "link.log").is_symlink()
    assert prune_logs(tmp_path, ran, {"tiny"}, keep_others=1) == []
    assert prune_logs(tmp_path / "absent", ran, set(), 0) == []
