"""A delete stays deleted, through real peer daemons: a tombstone goes only once every member
heard of has exchanged since its delete (the collection rule itself: unit/test_tombstones.py)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ..conftest import drekifs, wait_for
from .test_cluster import NODES, members, three_nodes


@pytest.mark.mounted
def test_deleted_keys_stay_deleted_past_a_pause_and_a_restart(
    tmp_path: Path, zone_file, mount_world
) -> None:
    """The issue's case: c paused (SIGSTOP) until the others call it dead, b unmounted; 100
    keys deleted on a; well past the grace, c resumes and b comes back: no key returns, and
    the tombstones go once both have exchanged since."""
    zone, _ = three_nodes()
    path = zone_file(zone)
    ring = tmp_path / "ring"
    drekifs("keygen", ring)
    flags = ("--zone", path, "--keyring", ring, "--tombstone-grace", "60")
    m = {n: mount_world(*flags, "--node", n, name=f"m{n}") for n in NODES}
    a, b, c = (m[n].path for n in NODES)
    for n in NODES:
        wait_for(lambda n=n: set(members(m[n].path).values()) == {"alive"}, timeout=20)
    (a / "global" / "del").mkdir()
    for i in range(100):
        (a / "global" / "del" / f"k{i}").write_text(f"{i}\n")

    def count(p: Path) -> int:
        d = p / "global" / "del"
        return len(os.listdir(d)) if d.is_dir() else -1

    for p in (b, c):
        wait_for(lambda p=p: count(p) == 100, timeout=20, what=f"the keys on {p.name}")
    m["b"].umount()  # b restarts past the grace
    pid = m["c"].pid
    os.kill(pid, signal.SIGSTOP)  # c pauses past it
    try:
        wait_for(lambda: members(a)["c"] == "dead", timeout=30, what="c dead for a")
        for i in range(100):
            os.unlink(a / "global" / "del" / f"k{i}")
        deleted = time.monotonic()
        # Past the grace and a collection round: a keeps the tombstones for b and c.
        wait_for(lambda: time.monotonic() - deleted > 60 + 15 + 2, timeout=90, interval=1)
        stats = json.loads((a / ".dreki" / "replication").read_text())
        assert stats["tombstones_collected"] == 0
        assert {"b", "c"} <= {n.split(".")[0] for n in stats["tombstones_wait_for"]}
    finally:
        os.kill(pid, signal.SIGCONT)
    m["b"].remount()
    for n in NODES:
        wait_for(lambda n=n: set(members(m[n].path).values()) == {"alive"}, timeout=30)

    # No key comes back, anywhere, while they all exchange; then the tombstones go on a.
    def collected() -> bool:
        for p in (a, b, c):
            assert os.listdir(p / "global" / "del") == [], f"keys came back on {p}"
        return json.loads((a / ".dreki" / "replication").read_text())["tombstones_collected"] >= 100

    wait_for(collected, timeout=120, interval=1, what="a's tombstones collected")
    for p in (a, b, c):
        assert os.listdir(p / "global" / "del") == []
