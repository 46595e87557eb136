"""What an operator installs, read without running anything: the sample configuration file
(the unit and the mount(8) helper at work: mounted/test_packaging.py)."""

from __future__ import annotations

from pathlib import Path

from drekifs.app import config

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def test_the_sample_config_is_valid() -> None:

    values = config.load(PACKAGING / "drekifs.toml")
    # What the unit and the fstab line assume: /dreki, this node's data in /var/lib/drekifs.
    assert values["mountpoint"] == "/dreki"
    assert values["data_dir"] == Path("/var/lib/drekifs")
    assert values["node"] and values["keyring"] == "/etc/drekifs/keyring"
