"""Peers on three hosts (network namespaces on a bridge): loss, partition, healing.

Each daemon runs inside its namespace (``ip netns exec``) and mounts in the shared mount table;
the zone gives each node its namespace's address. nftables makes loss and partitions.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import DREKIFS, drekifs, force_unmount, is_mounted, wait_for
from ..netns import Hosts, have_netns
from ..worlds import Zone

pytestmark = [
    pytest.mark.mounted,
    pytest.mark.skipif(have_netns() is not None, reason=str(have_netns())),
]
N = 3
PORT = 7946


def states(mnt: Path) -> dict[str, str]:
    rows = json.loads((mnt / ".dreki" / "members.json").read_text())
    return {r["node"].split(".")[0]: r["state"] for r in rows}


@contextlib.contextmanager
def started(tmp_path: Path, n: int, subnet: int):
    """``n`` hosts, each running a mounted peer of one world; all of it removed afterwards."""
    h = Hosts(tag="dk" + secrets.token_hex(2), subnet=subnet)
    h.create(n)
    zone = Zone().region("@", [f"n{i}" for i in range(n)])
    for i in range(n):
        zone.node(f"n{i}", port=PORT, host=f"{h.ip(i)}.")
    (tmp_path / "world.zone").write_text(zone.text())
    drekifs("keygen", tmp_path / "ring")
    mounts = [tmp_path / f"m{i}" for i in range(n)]
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
        for i in range(n):
            log = tmp_path / f"d{i}" / "drekifs.log"
            if log.exists() and "Traceback" in log.read_text():
                pytest.fail(f"daemon log of n{i} has a traceback:\n{log.read_text()[-4000:]}")


@pytest.fixture
def hosts(tmp_path: Path):
    with started(tmp_path, N, 77) as running:
        yield running


def dump(mnt: Path) -> dict[str, tuple[str, str]]:
    """Every file of the global store at the root: name -> (content, version)."""
    out = {}
    for name in sorted(os.listdir(mnt / "global")):
        p = mnt / "global" / name
        out[name] = (p.read_text(), os.getxattr(p, "user.dreki.version").decode())
    return out


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


def test_five_hosts_split_then_heal_hold_the_same_global_store(tmp_path: Path) -> None:
    with started(tmp_path, 5, 78) as (h, mounts):
        for m in mounts:
            wait_for(lambda m=m: set(states(m).values()) == {"alive"}, timeout=30, what="alive")
        left, right = (0, 1), (2, 3, 4)
        for i in left:
            for j in right:
                h.cut(i, j)
                h.cut(j, i)
        for side in (left, right):
            wait_for(
                lambda side=side: (
                    states(mounts[side[0]])[f"n{(set(range(5)) - set(side)).pop()}"] == "dead"
                ),
                timeout=30,
                what="the other side dead",
            )
        written: dict[str, set[str]] = {}
        for side, tag in ((left, "L"), (right, "R")):
            m = mounts[side[0]]
            for k in range(10):
                name = f"{tag}{k}" if k < 7 else f"both{k}"  # three keys written on both sides
                with open(m / "global" / name, "w") as f:
                    f.write(f"{tag} wrote {k}\n")
                    f.flush()
                    os.fsync(f.fileno())  # acknowledged
                written.setdefault(name, set()).add(f"{tag} wrote {k}\n")
        for i in range(5):
            h.heal(i)
        wait_for(
            lambda: all(dump(m) == dump(mounts[0]) for m in mounts[1:]),
            timeout=90,
            interval=1.0,
            what="identical global stores",
        )
        final = dump(mounts[0])
        contents = {text for text, _ in final.values()}
        for name, texts in written.items():
            assert texts <= contents, (name, texts)  # no acknowledged write missing
        assert sum(".dreki-conflict-" in n for n in final) == 3
