"""What an operator installs: the systemd unit and the mount(8) helper."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from drekifs.app import config

from .conftest import DREKIFS

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (PACKAGING / "drekifs.service").read_text()
    # As installed, /usr/local/bin/drekifs is the venv's command: point there.
    unit = unit.replace("/usr/local/bin/drekifs", DREKIFS)
    (tmp_path / "drekifs.service").write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "drekifs.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "drekifs.service" in line
    ]
    assert not problems, problems
    for needed in ("Type=notify", "ExecStop=", "DeviceAllow=/dev/fuse rw"):
        assert needed in unit
    for hides_the_mount in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert f"\n{hides_the_mount}=" not in unit


def test_the_mount_helper_passes_fuse_options_and_drops_the_others(tmp_path: Path) -> None:
    fake = tmp_path / "drekifs"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    helper = PACKAGING / "mount.fuse.drekifs"
    env = {"DREKIFS": str(fake), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [helper, "/etc/drekifs/drekifs.toml", "/dreki", "-o", "defaults,_netdev,allow_other,ro"],
        check=True,
        env=env,
        timeout=10,
    )
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args == [
        "mount", "--config", "/etc/drekifs/drekifs.toml", "-o", "allow_other,ro", "/dreki"
    ]  # fmt: skip
    subprocess.run([helper, "C", "/m", "-o", "defaults,_netdev"], check=True, env=env, timeout=10)
    assert (tmp_path / "args").read_text().split("\n")[:-1] == ["mount", "--config", "C", "/m"]


@pytest.mark.mounted
def test_make_demo_tour_runs_as_printed(tmp_path: Path) -> None:
    """The three-peer demo (packaging/demo.sh, what `make demo` runs), with its tour checked."""
    result = subprocess.run(
        [PACKAGING / "demo.sh", tmp_path / "m", tmp_path / "d"],
        env={"DEMO_CHECK": "1", "DREKIFS": DREKIFS, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tour: all as printed" in result.stdout


@pytest.mark.mounted
def test_mount_helper_mounts_from_a_config_file(tmp_path: Path) -> None:
    """What `mount -t fuse.drekifs CONFIG MOUNTPOINT` runs (mount(8) calls the helper so), and
    `mount -t` itself when the helper is installed (make install)."""
    from .conftest import is_mounted

    config = tmp_path / "drekifs.toml"
    config.write_text('node = "node2"\ndata-dir = "data"\nlog-level = "INFO"\n')
    mnt = tmp_path / "dreki"
    env = {"DREKIFS": DREKIFS, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DREKIFS_CONFIG": ""}
    subprocess.run(
        [PACKAGING / "mount.fuse.drekifs", config, mnt, "-o", "defaults,_netdev"],
        check=True,
        env=env,
        timeout=60,
    )
    try:
        assert is_mounted(mnt)
        assert (tmp_path / "data").is_dir()  # relative to the config file
        # The file's node, not the default first one: the daemon says which node it is.
        log = (tmp_path / "data" / "drekifs.log").read_text()
        assert " as node node2." in log, log
    finally:
        subprocess.run([DREKIFS, "umount", mnt], check=True, timeout=60)
    # And mount(8) itself: with the helper in /sbin (as make install puts it), for this test
    # only when it is not installed already.
    installed = Path("/sbin/mount.fuse.drekifs")
    ours = not installed.exists()
    if ours:
        helper = (PACKAGING / "mount.fuse.drekifs").read_text()
        installed.write_text(helper.replace("/usr/local/bin/drekifs", DREKIFS))
        installed.chmod(0o755)
    try:
        subprocess.run(["mount", "-t", "fuse.drekifs", config, mnt], check=True, timeout=60)
        assert is_mounted(mnt)
        subprocess.run([DREKIFS, "umount", mnt], check=True, timeout=60)
    finally:
        if ours:
            installed.unlink()


def test_the_sample_config_is_valid() -> None:
    values = config.load(PACKAGING / "drekifs.toml")
    # What the unit and the fstab line assume: /dreki, this node's data in /var/lib/drekifs.
    assert values["mountpoint"] == "/dreki"
    assert values["data_dir"] == Path("/var/lib/drekifs")
    assert values["node"] and values["keyring"] == "/etc/drekifs/keyring"
