"""The request loop's seam in the pyfuse3 installed, through a real mount: pyfuse3's workers
find the loop's Lock and wait_readable where install put them (fs/requestloop.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import force_unmount

SEAM_SCRIPT = """
import json, os, sys
import pyfuse3, trio
from drekifs.fs import requestloop

class Root(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = inode, 0o40755, 2
        return attr

loop = requestloop.install(50)
shim, calls = loop.trio, {"Lock": 0, "wait_readable": 0, "seat": 0}
lock, wait = shim.Lock, shim.lowlevel.wait_readable

def counted_lock():
    calls["Lock"] += 1
    return lock()

async def counted_wait(fd):
    calls["wait_readable"] += 1
    calls["seat"] += loop.seat.taken  # waited on the seat: pyfuse3 holds its lock there
    await wait(fd)

shim.Lock, shim.lowlevel.wait_readable = counted_lock, counted_wait
pyfuse3.init(Root(), sys.argv[1], set(pyfuse3.default_options))

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main, requestloop.MIN_TASKS)
        await trio.to_thread.run_sync(os.stat, sys.argv[1])
        pyfuse3.terminate()

try:
    trio.run(main)
finally:
    pyfuse3.close()
print(json.dumps(calls))
"""


@pytest.mark.mounted
def test_pyfuse3s_workers_wait_through_the_installed_loop(tmp_path: Path) -> None:
    # The seam itself, in the pyfuse3 installed: its workers find the loop's Lock and
    # wait_readable through the module global trio, and wait on the fd holding the seat.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        out = subprocess.run(
            [sys.executable, "-c", SEAM_SCRIPT, str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        force_unmount(mnt)
    calls = json.loads(out)
    assert calls["Lock"] == 1  # one lock per session
    assert calls["wait_readable"] >= 2  # the kernel's INIT, then the GETATTR of the stat
    assert calls["seat"] == calls["wait_readable"]
