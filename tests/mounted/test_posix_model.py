"""A stateful property: random operations on the mount and on tmpfs give the same results.

Every step runs on both trees and compares the outcome (the errno, or success); after every
step the whole trees are compared: kinds, sizes, contents, symlink targets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

pytestmark = pytest.mark.mounted

NAMES = ["a", "b", "c", "d", "d", "d/a", "d/b", "d/e", "d/e", "d/e/f", "b/a", "d/e/a"]
paths = st.sampled_from(NAMES)
data = st.binary(max_size=300)


def outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as e:
        return f"errno {e.errno}"
    return "ok"


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", st_.st_size, f.read())
    return out


def write(path: Path, content: bytes, mode: str) -> None:
    with open(path, mode) as f:
        f.write(content)


def write_at(path: Path, offset: int, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, content, offset)
    finally:
        os.close(fd)


@pytest.fixture
def tmpfs(tmp_path: Path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_the_mount_behaves_like_tmpfs(mount_world, tmpfs: Path) -> None:
    m = mount_world()
    ours = m.path / "global" / "model"
    ours.mkdir()

    class Model(RuleBasedStateMachine):
        @initialize()
        def clean(self) -> None:
            for root in (ours, tmpfs):
                for child in root.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()

        def both(self, fn, *args, paths: int = 1) -> None:
            """Run fn on both trees; its first ``paths`` arguments are relative paths."""
            a = outcome(fn, *[ours / x for x in args[:paths]], *args[paths:])
            b = outcome(fn, *[tmpfs / x for x in args[:paths]], *args[paths:])
            assert a == b, f"{fn.__name__}{args}: drekifs {a}, tmpfs {b}"

        @rule(p=paths, content=data)
        def create(self, p: str, content: bytes) -> None:
            self.both(write, p, content, "wb")

        @rule(p=paths, content=data)
        def append(self, p: str, content: bytes) -> None:
            self.both(write, p, content, "ab")

        @rule(p=paths, offset=st.integers(0, 500), content=data)
        def write_at(self, p: str, offset: int, content: bytes) -> None:
            self.both(write_at, p, offset, content)

        @rule(p=paths, size=st.integers(0, 400))
        def truncate(self, p: str, size: int) -> None:
            self.both(os.truncate, p, size)

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self.both(os.rename, src, dst, paths=2)

        @rule(p=paths)
        def unlink(self, p: str) -> None:
            self.both(os.unlink, p)

        @rule(p=paths)
        def mkdir(self, p: str) -> None:
            self.both(os.mkdir, p)

        @rule(p=paths)
        def rmdir(self, p: str) -> None:
            self.both(os.rmdir, p)

        @rule(p=paths, to=st.sampled_from(["a", "d", "nowhere", "d/e"]))
        def symlink(self, p: str, to: str) -> None:
            self.both(lambda link, target: os.symlink(target, link), p, to)

        @invariant()
        def same_trees(self) -> None:
            assert snapshot(ours) == snapshot(tmpfs)

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=150,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
