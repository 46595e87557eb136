"""The data directory's checks on their own, no daemon: tighten refuses what is not a locked
data directory, and the control socket's directory is private (issue 15, case 6; through a
mount: mounted/test_datadir.py)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from drekifs.app.control import control_socket_path
from drekifs.datadir import DataDirError, private_dir, tighten


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The daemons started inside run under this umask (as from a shell or fstab)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_tighten_touches_only_a_locked_data_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    os.chmod(tmp_path / "f", 0o644)
    for wrong in (Path(""), Path("relative"), tmp_path):  # the last: no daemon.lock in it
        with pytest.raises(ValueError, match="not a locked data directory"):
            tighten(wrong)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


# -- the control socket's directory --------------------------------------------------------------


def test_private_dir_is_made_0700_and_checked(tmp_path: Path) -> None:
    with umask(0o022):
        made = private_dir(tmp_path / "new")
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700
    assert private_dir(made) == made  # ours, 0700: used again

    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o1777)
    with pytest.raises(DataDirError, match=r"writable by others.*1777|1777.*writable by others"):
        private_dir(open_to_all)

    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(DataDirError, match="symbolic link"):
        private_dir(link)

    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(DataDirError, match="not a directory"):
        private_dir(plain)

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(DataDirError, match="owned by uid 65534"):
        private_dir(theirs)


def test_control_socket_falls_back_to_a_checked_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    short = tmp_path / "d"
    assert control_socket_path(short) == short / "control.sock"
    long = tmp_path / ("d" * 100)
    path = control_socket_path(long)
    assert path.parent == tmp_path / "t" / f"drekifs-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700
    os.chmod(path.parent, 0o777)
    with pytest.raises(DataDirError, match=str(path.parent)):
        control_socket_path(long)
