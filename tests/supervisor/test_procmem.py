"""A worker's memory: its process tree read from /proc (procmem.py), as psutil reads it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from neuronctl.supervisor import procmem

pytestmark = pytest.mark.skipif(not procmem.lists_children(),
                                reason="this kernel lists no task's children")

# A parent that starts children on request (a line on its stdin: how many), each holding
# 8 MiB, and reaps one it is told of ("reap PID"); it and each child say so with one write
# (one line each, never interleaved).
PARENT = r"""
import os, subprocess, sys
CHILD = "import os, time; x = bytearray(8 << 20); os.write(1, b'child\\n'); time.sleep(60)"
os.write(1, b"parent\n")
kids = {}
for line in sys.stdin:
    word = line.split()
    if word[0] == "reap":
        kids.pop(int(word[1])).wait(10)
        os.write(1, b"reaped\n")
        continue
    for _ in range(int(word[0])):
        kid = subprocess.Popen([sys.executable, "-c", CHILD])
        kids[kid.pid] = kid
"""


class Tree:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        self.closed = False
        assert self.said() == [b"parent\n"]

    def said(self, lines: int = 1) -> list[bytes]:
        assert self.process.stdout is not None
        return [self.process.stdout.readline() for _ in range(lines)]

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def grow(self, children: int) -> None:
        self.tell(str(children))
        assert self.said(children) == [b"child\n"] * children

    def end_child(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.tell(f"reap {pid}")
        assert self.said() == [b"reaped\n"]

    def by_psutil(self) -> int:
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def children(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def tree() -> Iterator[Tree]:
    made = Tree()
    yield made
    made.close()


def test_the_whole_tree_is_counted_as_psutil_counts_it(tree: Tree) -> None:
    tree.grow(2)
    ours = procmem.TreeMemory().rss(tree.process.pid)
    assert ours is not None and ours > 16 << 20  # both children's 8 MiB
    assert abs(ours - tree.by_psutil()) < 1 << 20  # read a moment apart


def test_the_tree_is_walked_again_when_a_process_leaves_or_its_time_is_up(
    tree: Tree,
) -> None:
    now = [0.0]
    memory = procmem.TreeMemory(clock=lambda: now[0])
    tree.grow(2)
    both = memory.rss(tree.process.pid)
    assert both is not None
    tree.end_child(tree.children()[0])
    one = memory.rss(tree.process.pid)  # the tree remembered has a process gone
    assert one is not None and one < both - (6 << 20)
    tree.grow(1)  # a new child: seen once the tree is walked again
    assert memory.rss(tree.process.pid) == pytest.approx(one, abs=1 << 20)
    now[0] += procmem.TREE_TTL_S + 1
    again = memory.rss(tree.process.pid)
    assert again is not None and again > one + (6 << 20)


def test_a_process_gone_has_no_memory(tree: Tree) -> None:
    memory = procmem.TreeMemory()
    pid = tree.process.pid
    assert memory.rss(pid) is not None
    tree.close()
    assert memory.rss(pid) is None
    assert os.getpid() != pid
