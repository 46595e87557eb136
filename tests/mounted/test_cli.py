"""The drekifs command without a mount: world, --check, --json, usage errors, --help."""

from __future__ import annotations

import json
from pathlib import Path

from ..conftest import drekifs
from ..worlds import broken_world, small_world


def test_world_prints_the_demo_tree() -> None:
    out = drekifs("world").stdout
    assert out.startswith('inf.random.sh  "Random infrastructure"\n')
    for path_line in (
        'node1  "sbg1 web front"  localhost:7101',
        '└── eu/  "Europe"',
        'node5  "Geneva edge"  localhost:7105',
    ):
        assert path_line in out
    r = drekifs("world", "--check")
    assert r.returncode == 0 and "no world errors (15 regions, 6 nodes)" in r.stdout


def test_check_lists_each_error_and_exits_1(zone_file) -> None:
    r = drekifs("world", "--zone", zone_file(broken_world()), "--check", check=False)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0] == "7 world errors in b.test:"
    text = r.stdout
    assert "cycle: cycle eu.b.test -> fr.eu.b.test -> eu.b.test" in text
    assert "dangling: ghost.eu.b.test (listed by eu.b.test)" in text
    assert "reserved-name: member global.fr.eu.b.test of fr.eu.b.test" in text
    assert "sibling-clash: members of us.b.test share the name 'web1'" in text
    assert "dot-name: member \\.hidden.fr.eu.b.test" in text


def test_world_json_and_explicit_world(zone_file, tmp_path: Path) -> None:
    path = zone_file(small_world())
    data = json.loads(drekifs("world", "--zone", path, "--json").stdout)
    assert data["domain"] == "w.test"
    assert data["nodes"]["shared.w.test"]["addresses"] == [["localhost", 7004, 0, 0]]
    # A zone without $ORIGIN needs --world.
    bare = tmp_path / "bare.zone"
    bare.write_text(
        "\n".join(
            ln for ln in small_world().text().splitlines() if not ln.startswith("$ORIGIN")
        ).replace("@ IN", "w.test. IN")
    )
    r = drekifs("world", "--zone", bare, check=False)
    assert r.returncode == 3 and "--world" in r.stderr


def test_usage_errors() -> None:
    r = drekifs("world", "--zone", "x", "--dns", "y", check=False)
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = drekifs("world", "--world", "w.test", "--dns", "host:99999", check=False)
    assert r.returncode == 2 and "bad port" in r.stderr
    r = drekifs("world", "--dns", "127.0.0.1", check=False)
    assert r.returncode == 2 and "--world DOMAIN" in r.stderr
    r = drekifs(check=False)
    assert r.returncode == 2


def test_help_explains_every_command() -> None:
    out = drekifs("--help").stdout
    for cmd in ("mount", "umount", "world", "urn", "path"):
        assert cmd in out
        assert drekifs(cmd, "--help").returncode == 0
    mount_help = drekifs("mount", "--help").stdout
    for opt in ("--world", "--zone", "--dns", "--node", "--data-dir", "-o", "--foreground"):
        assert opt in mount_help
