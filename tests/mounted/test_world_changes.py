"""The mounted tree follows the world: zone file edits and a real nsd server reloading."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from ..conftest import drekifs, wait_for
from ..worlds import small_world

pytestmark = pytest.mark.mounted


def listing(path: Path) -> set[str]:
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def gone(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOENT
    return False


def check_follows(m, change, revert) -> None:
    """Add a node to eu/de and remove eu/fr/db1, then undo; the kernel's caches must follow."""
    de, db1 = m.path / "eu/de", m.path / "eu/fr/db1"
    # Warm every cache: entries and attributes are cached for an hour.
    assert listing(de) == {"web1", "global"}
    de_before = os.stat(de)
    os.stat(db1)
    os.stat(db1 / "local")
    eu_mtime = os.stat(m.path / "eu").st_mtime_ns
    de_store_mtime = os.stat(de / "global").st_mtime_ns
    world_before = (m.path / ".dreki" / "world").read_text()

    change()
    wait_for(lambda: "new" in listing(de), timeout=15, what="the new node")
    assert sorted(os.listdir(de / "new")) == ["global", "local"]
    assert os.getxattr(de / "new", "user.dreki.urn").endswith(b":eu:de:new")
    wait_for(lambda: gone(db1), timeout=5, what="the removed node to vanish from the cache")
    assert gone(db1 / "local")
    de_after = os.stat(de)
    assert de_after.st_nlink == de_before.st_nlink + 1
    assert de_after.st_mtime_ns > de_before.st_mtime_ns
    assert os.stat(m.path / "eu").st_mtime_ns == eu_mtime  # eu's own entries did not change
    assert os.stat(de / "global").st_mtime_ns == de_store_mtime
    world_after = (m.path / ".dreki" / "world").read_text()
    assert "new" in world_after and world_after != world_before
    assert "changed" in m.log() and "added new.de.eu" in m.log()

    revert()
    wait_for(lambda: "new" not in listing(de), timeout=15, what="the node to go")
    wait_for(lambda: not gone(db1), timeout=5, what="db1 back")


def test_zone_file_edit_appears_without_remount(mount_world, zone_file) -> None:
    path = zone_file(small_world())
    m = mount_world("--zone", path)

    def change() -> None:
        zone_file(changed_world(), serial=2)

    def revert() -> None:
        zone_file(small_world(), serial=3)

    check_follows(m, change, revert)


def changed_world():
    zone = small_world()
    zone.lines = [ln for ln in zone.lines if "db1" not in ln]
    return zone.region("de.eu", ["new.de.eu"]).node("new.de.eu", 7010)


@pytest.mark.dns
def test_nsd_zone_reload_appears_without_remount(mount_world, nsd) -> None:
    server = nsd(small_world())
    m = mount_world("--world", "w.test", "--dns", server.server, "--min-refresh", "0.5")
    assert "shared" in listing(m.path / "eu")
    check_follows(m, lambda: server.reload(changed_world()), lambda: server.reload(small_world()))


@pytest.mark.dns
def test_last_good_world_served_when_dns_fails(mount_world, nsd, tmp_path: Path) -> None:
    server = nsd(small_world())
    m = mount_world("--world", "w.test", "--dns", server.server, "--min-refresh", "0.5")
    web1 = m.path / "eu/fr/web1"
    ino = os.stat(web1).st_ino
    server.stop()
    # DNS is down while mounted: the tree stays, and world-errors says why.
    errors = m.path / ".dreki" / "world-errors"
    wait_for(lambda: "source:" in errors.read_text(), timeout=15, what="the source error")
    assert "no DNS server answered" in errors.read_text()
    assert listing(m.path / "eu/fr") == {"web1", "db1", "shared", "global"}
    # Remounted with DNS still down: the last good world from the data directory.
    m.umount()
    m.remount()
    assert os.stat(web1).st_ino == ino
    assert listing(m.path / "eu/fr") == {"web1", "db1", "shared", "global"}
    assert "serving the last good world" in m.log()
    # A fresh data directory and no DNS: the mount fails and says why.
    r = drekifs(
        "mount",
        "--world",
        "w.test",
        "--dns",
        server.server,
        "--data-dir",
        tmp_path / "fresh",
        tmp_path / "m2",
        check=False,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot load the world" in r.stderr
    # DNS back: the error clears.
    server.start()
    wait_for(lambda: errors.read_text() == "", timeout=15, what="the error to clear")


@pytest.mark.dns
def test_world_command_over_dns_honours_ttl(nsd) -> None:
    server = nsd(small_world())
    r = drekifs("world", "--world", "w.test", "--dns", server.server, "--json")
    import json

    data = json.loads(r.stdout)
    assert data["ttl"] == 1
    assert "eu/fr/web1" in {p["path"] for p in data["paths"]}
    t0 = time.monotonic()
    r = drekifs("world", "--world", "w.test", "--dns", "127.0.0.1:9", "--check", check=False)
    assert r.returncode == 3 and "cannot read the world" in r.stderr
    assert time.monotonic() - t0 < 20
