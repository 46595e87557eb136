"""Peers on three hosts (network namespaces on a bridge): loss, partition, healing.

Each daemon runs inside its namespace (``ip netns exec``) and mounts in the shared mount table;
the zone gives each node its namespace's address. nftables makes loss and partitions.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import DREKIFS, drekifs, force_unmount, is_mounted, wait_for
from .netns import Hosts, have_netns
from .worlds import Zone

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(have_netns() is not None, reason=str(have_netns())),
]
N = 3
PORT = 7946


def states(mnt: Path) -> dict[str, str]:
    rows = json.loads((mnt / ".dreki" / "members.json").read_text())
    return {r["node"].split(".")[0]: r["state"] for r in rows}


@pytest.fixture
def hosts(tmp_path: Path):
    h = Hosts(tag="dk" + secrets.token_hex(2), subnet=77)
    h.create(N)
    zone = Zone().region("@", [f"n{i}" for i in range(N)])
    for i in range(N):
        zone.node(f"n{i}", port=PORT, host=f"{h.ip(i)}.")
    (tmp_path / "world.zone").write_text(zone.text())
    drekifs("keygen", tmp_path / "ring")
    mounts = [tmp_path / f"m{i}" for i in range(N)]
    try:
        for i, m in enumerate(mounts):
            cmd = h.exec(i, DREKIFS, "mount", "--zone", str(tmp_path / "world.zone"))
            cmd += ["--node", f"n{i}", "--keyring", str(tmp_path / "ring")]
            cmd += ["--data-dir", str(tmp_path / f"d{i}"), str(m)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        yield h, mounts
    finally:
        for m in mounts:
            if is_mounted(m) and drekifs("umount", m, check=False).returncode != 0:
                force_unmount(m)
        h.destroy()
        for i in range(N):
            log = tmp_path / f"d{i}" / "drekifs.log"
            if log.exists() and "Traceback" in log.read_text():
                pytest.fail(f"daemon log of n{i} has a traceback:\n{log.read_text()[-4000:]}")


def test_loss_partition_heal(hosts) -> None:
    h, mounts = hosts
    for m in mounts:
        wait_for(lambda m=m: set(states(m).values()) == {"alive"}, timeout=20, what="all alive")

    # Through host 0's mount, into node 1's store (over the bridge).
    target = mounts[0] / "n1" / "local" / "from-n0"
    target.write_text("across hosts\n")
    landed = mounts[1] / "n1" / "local" / "from-n0"
    # close() does not wait for release, which carries the bytes to the owner: poll.
    wait_for(lambda: landed.exists() and landed.read_text() == "across hosts\n", what="landed")

    # 10 % loss everywhere (and 20 ms delay where the kernel has netem): nobody dies.
    for i in range(N):
        h.loss(i, 10)
        h.delay(i, 20)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # bounded: 8 s, 16 looks
        for m in mounts:
            assert "dead" not in states(m).values(), states(m)
        time.sleep(0.5)
    for i in range(N):
        h.heal(i)

    # Host 2 cut off from 0 and 1: they mark it dead, and it comes back once healed.
    for i in (0, 1):
        h.cut(i, 2)
        h.cut(2, i)
    wait_for(lambda: states(mounts[0])["n2"] == "dead", timeout=20, what="n2 dead on n0")
    t0 = time.monotonic()
    with pytest.raises(OSError):
        os.listdir(mounts[0] / "n2" / "local")
    assert time.monotonic() - t0 < 2.5
    for i in range(N):
        h.heal(i)
    wait_for(lambda: states(mounts[0])["n2"] == "alive", timeout=40, what="n2 alive again")
    wait_for(lambda: states(mounts[2])["n0"] == "alive", timeout=40, what="n0 alive on n2")
