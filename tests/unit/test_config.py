"""The mount configuration file: values, precedence, errors with file and line, and the docs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

import drekifs.app.daemon
from drekifs.app import cli, config
from drekifs.app.daemon import MountConfig
from drekifs.app.options import parse_server
from drekifs.cluster.swim import SwimConfig
from drekifs.fs import requestloop

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREKIFS_CONFIG", "")


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch) -> list[MountConfig]:
    """cmd_mount runs as usual but hands its MountConfig here instead of mounting."""
    seen: list[MountConfig] = []

    def fake_mount(mc: MountConfig) -> int:
        seen.append(mc)
        return 0

    monkeypatch.setattr(drekifs.app.daemon, "mount", fake_mount)
    return seen


def write(tmp_path: Path, text: str, name: str = "drekifs.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mount(*argv: str | Path) -> int:
    return cli.main(["mount", *map(str, argv)])


FULL = """\
# every key
world = "Example.NET."
dns = ["127.0.0.1:5353", "[::1]:53"]
min-refresh = 2
max_refresh = 60.5
node = "web1"
data-dir = "state"
options = "ro,allow_other"
foreground = true
cache-timeout = 10
log-level = "debug"
log-file = "/var/log/drekifs.log"
keyring = "keys/ring"
store = ["cache", "scratch"]
max-global-value = "2MiB"
max-local-value = 4096
tombstone-grace = "12h"
poll-us = 40
probe-interval = "2s"
probe-timeout = 0.8
indirect-checks = 5
suspicion-mult = 3.5
mountpoint = "mnt"
"""


def test_every_key_reaches_the_mount_config(tmp_path: Path, mounted: list[MountConfig]) -> None:
    path = write(tmp_path, FULL)
    assert mount("--config", path) == 0
    (mc,) = mounted
    assert mc.mountpoint == tmp_path / "mnt"
    assert mc.source.domain == "example.net"
    assert mc.source.zone is None
    assert mc.source.servers == [("127.0.0.1", 5353), ("::1", 53)]
    assert (mc.source.min_refresh, mc.source.max_refresh) == (2.0, 60.5)
    assert mc.node == "web1"
    assert mc.data_dir == tmp_path / "state"
    assert mc.fuse_options == ["ro", "allow_other"]
    assert mc.foreground is True
    assert mc.cache_timeout == 10.0
    assert mc.log_level == "DEBUG"
    assert mc.log_file == Path("/var/log/drekifs.log")
    assert mc.keyring == tmp_path / "keys" / "ring"
    assert mc.stores == ["cache", "scratch"]
    assert mc.max_global_value == 2 << 20
    assert mc.max_local_value == 4096
    assert mc.tombstone_grace == 12 * 3600.0
    assert mc.poll_us == 40
    assert (mc.swim.probe_interval, mc.swim.probe_timeout) == (2.0, 0.8)
    assert (mc.swim.indirect_checks, mc.swim.suspicion_mult) == (5, 3.5)


def test_flags_override_the_file(tmp_path: Path, mounted: list[MountConfig]) -> None:
    path = write(tmp_path, FULL)
    zone = cli.demo_zone()
    argv = ["--config", path, "--zone", zone, "--node", "db1", "--store", "other"]
    argv += ["-o", "rw", "--max-global-value", "1k", "--tombstone-grace", "90"]
    argv += ["--log-level", "ERROR", "--cache-timeout", "5", "--data-dir", tmp_path / "d"]
    argv += ["--poll-us", "0", "--suspicion-mult", "2"]
    assert mount(*argv, tmp_path / "elsewhere") == 0
    (mc,) = mounted
    assert mc.mountpoint == tmp_path / "elsewhere"
    assert mc.source.zone == zone and mc.source.servers is None  # --zone drops the file's dns
    assert mc.source.domain == "example.net"  # world still from the file
    assert mc.node == "db1"
    assert mc.stores == ["other"]
    assert mc.fuse_options == ["rw"]
    assert mc.max_global_value == 1024
    assert mc.max_local_value == 4096  # not given: from the file
    assert mc.tombstone_grace == 90.0
    assert mc.poll_us == 0  # 0 from the command line overrides the file's 40
    assert mc.swim.suspicion_mult == 2.0 and mc.swim.probe_interval == 2.0
    assert mc.log_level == "ERROR"
    assert mc.cache_timeout == 5.0
    assert mc.data_dir == tmp_path / "d"


def test_built_in_defaults_without_a_file(tmp_path: Path, mounted: list[MountConfig]) -> None:
    assert mount(tmp_path) == 0
    (mc,) = mounted
    assert mc.source.zone == cli.demo_zone()
    assert (mc.source.min_refresh, mc.source.max_refresh) == (1.0, 300.0)
    assert mc.foreground is False and mc.fuse_options == [] and mc.stores == []
    assert mc.cache_timeout == 3600.0 and mc.log_level == "INFO" and mc.log_file is None
    assert mc.max_global_value == 1 << 20 and mc.max_local_value == 64 << 20
    assert mc.tombstone_grace == 7 * 86400.0 and mc.keyring is None
    assert mc.poll_us == 100 == requestloop.POLL_US  # the command's default is the module's
    assert mc.swim == SwimConfig()  # the failure detector's defaults are the module's
    assert mc.data_dir == cli.default_data_dir(None, cli.demo_zone(), None)


def test_the_default_file_comes_from_the_environment(
    tmp_path: Path, mounted: list[MountConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'mountpoint = "/dreki"\nnode = "n1"\n')
    monkeypatch.setenv("DREKIFS_CONFIG", str(path))
    assert config.default_path() == path
    assert mount() == 0
    assert mounted[-1].mountpoint == Path("/dreki") and mounted[-1].node == "n1"
    # --config wins over the default file
    other = write(tmp_path, 'node = "n2"\n', "other.toml")
    assert mount("--config", other, "/m") == 0
    assert mounted[-1].node == "n2"
    # a missing default file is no file
    monkeypatch.setenv("DREKIFS_CONFIG", str(tmp_path / "absent.toml"))
    assert config.default_path() is None
    monkeypatch.delenv("DREKIFS_CONFIG")


def test_no_mountpoint_anywhere_is_a_usage_error(
    tmp_path: Path, mounted: list[MountConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'node = "n1"\n')
    with pytest.raises(SystemExit) as e:
        mount("--config", path)
    assert e.value.code == cli.EXIT_USAGE
    assert "MOUNTPOINT" in capsys.readouterr().err
    assert mounted == []


def test_probe_timeout_must_be_under_the_interval(
    tmp_path: Path, mounted: list[MountConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        mount("--probe-interval", "1", "--probe-timeout", "1.5", tmp_path)
    assert e.value.code == cli.EXIT_USAGE
    assert "need 0 < probe_timeout < probe_interval" in capsys.readouterr().err
    assert mounted == []


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ('node = "a"\n\ntombstone_gracee = "7d"\n', 3, "tombstone_gracee", "'tombstone-grace'"),
        ("zzz = 1\n", 1, "zzz", "known keys: world, zone"),
        ('node = "a"\n[mount]\nnode = "b"\n', 2, "mount", "unknown key"),
        ('\nmax-global-value = "1Q"\n', 2, "max-global-value", "'1Q' is not a size"),
        ("max-local-value = 1.5\n", 1, "max-local-value", "expected a size"),
        ('tombstone-grace = "soon"\n', 1, "tombstone-grace", "'soon' is not a duration"),
        ('tombstone-grace = "-1d"\n', 1, "tombstone-grace", "not negative"),
        ('store = ["ok", "Bad!"]\n', 1, "store", "'Bad!' is not a store name"),
        ('store = "global"\n', 1, "store", "is not a store name"),
        ('  "log-level" = "LOUD"\n', 1, "log-level", "is not one of"),
        ('log-level = "LOUD"\n', 1, "log-level", "'LOUD' is not one of DEBUG, INFO"),
        ("foreground = 1\n", 1, "foreground", "expected true or false"),
        ("poll-us = 20000\n", 1, "poll-us", "'20000' is not a poll time (microseconds, 0 to"),
        ('poll-us = "fast"\n', 1, "poll-us", "'fast' is not a poll time"),
        ("poll-us = 1.5\n", 1, "poll-us", "expected microseconds (an integer), got"),
        ('cache-timeout = "x"\n', 1, "cache-timeout", "'x' is not a duration"),
        ("cache-timeout = -5\n", 1, "cache-timeout", "a duration is not negative"),
        ("node = 3\n", 1, "node", "expected a string, got an integer"),
        ('dns = ["h:99999"]\n', 1, "dns", "bad port"),
        ('zone = "z"\n# x\ndns = "h"\n', 3, "dns", "either zone or dns"),
        ('node = "a"\nnode_ = 1\ndata_dir = "x"\ndata-dir = "y"\n', 2, "node_", "unknown"),
        ('data_dir = "x"\ndata-dir = "y"\n', 2, "data-dir", "set twice"),
        ("options = []\n", 1, "options", "empty list"),
        ("suspicion-mult = 0\n", 1, "suspicion-mult", "must be a number above 0"),
        ('suspicion-mult = "nan"\n', 1, "suspicion-mult", "must be a number above 0"),
        ("indirect-checks = 17\n", 1, "indirect-checks", "'17' is not a count of indirect"),
        ('probe-interval = "-1"\n', 1, "probe-interval", "not negative"),
    ],
)
def test_bad_values_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: key {key!r}: "), message
    assert reason in message


def test_toml_syntax_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'node = "a"\nworld = \n')
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}:2: ")
    assert "line 2" in str(e.value)


def test_bad_file_exits_with_usage_and_the_message(
    tmp_path: Path, mounted: list[MountConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'node = "a"\nmax-global-value = "big"\n')
    with pytest.raises(SystemExit) as e:
        mount("--config", path, "/m")
    assert e.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"drekifs: {path}:2: key 'max-global-value': ")
    with pytest.raises(SystemExit) as e:
        mount("--config", tmp_path / "absent.toml", "/m")
    assert e.value.code == cli.EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    assert mounted == []


# -- every option in the docs exists, and every option that exists is in the docs ------------


def mount_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["mount"]


def documented() -> dict[str, str]:
    """TOML key -> CLI flag, from the options table of docs/configuration.md."""
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]+)`", DOCS.read_text(), re.MULTILINE)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), "an option documented twice"
    return dict(rows)


def test_every_mount_option_is_deferred() -> None:
    """Each option but --config parses to None when not given, its own default kept apart:
    how a flag given wins over the file, and the file over the default."""
    p = mount_parser()
    dests = {a.dest for a in p._actions if a.dest not in ("help", "config")}
    assert set(p.get_default("mount_defaults")) == dests
    assert all(p.get_default(dest) is None for dest in dests)
    assert p.get_default("mount_defaults")["cache_timeout"] == 3600.0


def test_docs_list_exactly_the_options() -> None:
    docs = documented()
    actions = {
        (a.option_strings[-1] if a.option_strings else a.metavar): a.dest
        for a in mount_parser()._actions
        if a.dest not in ("help", "config")
    }
    assert set(docs.values()) == set(actions), "docs vs drekifs mount options"
    assert set(docs) == set(config.KEYS), "docs vs config file keys"
    for key, flag in docs.items():  # each key sets the dest of its documented flag
        assert config.KEYS[key][0] == actions[flag], key
    assert "--config" in DOCS.read_text()


def test_docs_example_is_a_valid_file(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert example is not None
    values: dict[str, Any] = config.load(write(tmp_path, example.group(1)))
    assert values["mountpoint"] == "/dreki" and values["store"] == ["cache"]


def test_seconds_are_durations_in_the_file_as_on_the_command_line(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('cache-timeout = 0.5\nmin-refresh = "2m"\ntombstone-grace = 1.5\n')
    values = config.load(p)
    assert values["cache_timeout"] == 0.5 and values["min_refresh"] == 120.0
    assert values["tombstone_grace"] == 1.5


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--max-global-value", "4MiB"], "--max-global-value 4194304: at most 3932160"),
        (["--tombstone-grace", "5s"], "--tombstone-grace 5s: at least 60s"),
    ],
)
def test_limits_past_what_replication_takes_are_refused(
    tmp_path: Path,
    mounted: list[MountConfig],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    said: str,
) -> None:
    with pytest.raises(SystemExit) as e:
        mount(*argv, tmp_path)
    assert e.value.code == 2 and not mounted
    assert said in capsys.readouterr().err


def test_the_largest_global_value_is_taken(tmp_path: Path, mounted: list[MountConfig]) -> None:
    assert mount("--max-global-value", "3932160", tmp_path) == 0


def test_parse_server() -> None:
    assert parse_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:5353") == ("::1", 5353)
    assert parse_server("::1") == ("::1", 53)
    for bad in ("host:0", "host:x", ":53"):
        try:
            parse_server(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
