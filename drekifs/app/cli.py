"""The ``drekifs`` command: mount, umount, world, urn, path.

Exit status: 0 success; 1 the thing asked about is wrong (world errors with --check, a bad URN,
a path outside a mount, a failed mount); 2 bad usage; 3 the world's source could not be read.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..cluster.keyring import KeyRing, KeyRingError
from ..stores.keys import MAX_GLOBAL_VALUE
from ..stores.record import MIN_TOMBSTONE_GRACE, TOMBSTONE_GRACE
from ..urn import URN, URNError, check_key_part
from ..world.render import render_errors, render_json, render_tree
from ..world.resolve import SourceError
from .config import ConfigError, default_path, load
from .control import ControlError, call
from .mounts import drekifs_mounts, unmount
from .options import (
    LOG_LEVELS,
    indirect_checks,
    parse_duration,
    parse_server,
    parse_size,
    poll_us,
    positive_number,
    store_name,
)
from .service import MountError

if TYPE_CHECKING:
    from ..cluster.swim.config import SwimConfig
    from ..world.watch import SourceConfig
    from .daemon import MountConfig

EXIT_PROBLEM = 1
EXIT_USAGE = 2
# SwimConfig's default, repeated: importing it here would load trio for every command.
SUSPICION_MULT = 2.0
EXIT_SOURCE = 3


def demo_zone() -> Path:
    return Path(str(resources.files("drekifs") / "data" / "demo.zone"))


# -- world source options, shared by mount and world -------------------------------------------


def add_source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the world comes from (default: the bundled demo world)")
    g.add_argument(
        "--world",
        metavar="DOMAIN",
        help="the world's DNS domain (default with --zone: the zone's $ORIGIN)",
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument("--zone", metavar="FILE", type=Path, help="read the world from a zone file")
    src.add_argument(
        "--dns",
        metavar="HOST[:PORT]",
        action="append",
        help="ask these DNS servers (repeatable); with --world alone, the system resolver",
    )
    g.add_argument(
        "--min-refresh",
        type=parse_duration,
        default=1.0,
        metavar="S",
        help="never look at DNS more often than this, whatever the TTLs (default 1)",
    )
    g.add_argument(
        "--max-refresh",
        type=parse_duration,
        default=300.0,
        metavar="S",
        help="look at DNS at least this often (default 300)",
    )


def source_config(args: argparse.Namespace) -> SourceConfig:
    """The world's source, from the world options of ``drekifs mount`` and ``drekifs world``."""
    # Here, not at the top: world.watch loads trio and dnspython, 110-130 ms of start-up that
    # every other command would pay (python -X importtime).
    from ..world.watch import SourceConfig

    world = args.world.lower().rstrip(".") if args.world else None
    zone = args.zone
    servers = None
    if args.dns:
        try:
            servers = [parse_server(s) for s in args.dns]
        except ValueError as e:
            raise SystemExit(_usage(str(e))) from None
        if world is None:
            raise SystemExit(_usage("--dns needs the world's domain: --world DOMAIN"))
    elif zone is None and world is None:
        zone = demo_zone()
    if zone is not None:
        zone = Path(os.path.abspath(zone))
    return SourceConfig(
        domain=world,
        zone=zone,
        servers=servers,
        min_refresh=args.min_refresh,
        max_refresh=args.max_refresh,
        poll=args.min_refresh,
    )


def _usage(message: str) -> int:
    print(f"drekifs: {message}", file=sys.stderr)
    return EXIT_USAGE


# -- commands ------------------------------------------------------------------------------------


def cmd_world(args: argparse.Namespace) -> int:
    # Here, not at the top: trio and dnspython, 110-130 ms for every other command.
    import trio

    from ..world.watch import fetch_world

    config = source_config(args)
    try:
        world = trio.run(fetch_world, config)
    except SourceError as e:
        print(f"drekifs: cannot read the world: {e}", file=sys.stderr)
        return EXIT_SOURCE
    if args.json:
        sys.stdout.write(render_json(world))
    elif not args.check:
        sys.stdout.write(render_tree(world))
    count = f"{len(world.errors)} world error" + ("" if len(world.errors) == 1 else "s")
    if args.check:
        out = sys.stderr if args.json else sys.stdout  # keep --json output valid JSON
        if world.errors:
            print(f"{count} in {world.domain}:", file=out)
            out.write(render_errors(world))
            return EXIT_PROBLEM
        print(
            f"{world.domain}: no world errors ({len(world.regions)} regions, "
            f"{len(world.nodes)} nodes)",
            file=out,
        )
    elif world.errors and not args.json:
        print(f"\n{count} (drekifs world --check lists them)", file=sys.stderr)
    return 0


def default_data_dir(world: str | None, zone: Path | None, node: str | None) -> Path:
    base = (
        Path("/var/lib/drekifs")
        if os.getuid() == 0
        else (Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "drekifs")
    )
    world_part = world or (zone.stem if zone else "world")
    return base / world_part / (node.replace("/", "_") if node else "default")


def _defer_defaults(p: argparse.ArgumentParser) -> None:
    """Make the options' defaults None, so that a flag given can be told from one not given;
    the built-in defaults go to ``args.mount_defaults``, used when the config file is silent.
    (An empty command line parses to every option's default: all of them, by public API.)"""
    defaults = vars(p.parse_args([]))
    del defaults["config"]
    p.set_defaults(**dict.fromkeys(defaults), mount_defaults=defaults)


def apply_config(args: argparse.Namespace) -> None:
    """Fill the mount options not given on the command line from the config file (--config,
    else $DREKIFS_CONFIG or /etc/drekifs/drekifs.toml when present), then from the built-in
    defaults. A bad config file is a usage error."""
    path = args.config or default_path()
    try:
        from_file = load(path) if path is not None else {}
    except ConfigError as e:
        raise SystemExit(_usage(str(e))) from None
    if args.zone is not None or args.dns is not None:  # the command line picks the source
        from_file.pop("zone", None)
        from_file.pop("dns", None)
    for dest, default in args.mount_defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, from_file.get(dest, default))


def mount_config(args: argparse.Namespace) -> MountConfig:
    """The MountConfig of ``drekifs mount`` ARGS: command line, then config file, then defaults."""
    # Here, not at the top: the daemon loads pyfuse3, trio, LMDB and the cluster, 150-200 ms
    # that every other command would pay (python -X importtime).
    from .daemon import MountConfig

    apply_config(args)
    if args.mountpoint is None:
        raise SystemExit(_usage("mount needs a MOUNTPOINT (or mountpoint in the config file)"))
    config = source_config(args)
    if args.data_dir is None:
        args.data_dir = default_data_dir(config.domain, config.zone, args.node)
    options = [o for opt in args.o or [] for o in opt.split(",") if o]
    if args.tombstone_grace < MIN_TOMBSTONE_GRACE:
        raise SystemExit(
            _usage(
                f"--tombstone-grace {args.tombstone_grace:g}s: at least {MIN_TOMBSTONE_GRACE:g}s "
                "(three anti-entropy intervals: a shorter one drops entries of every peer "
                "that misses a few exchanges)"
            )
        )
    if args.max_global_value > MAX_GLOBAL_VALUE:
        # A global entry travels whole in one 4 MiB frame, with up to 256 KiB of path, xattrs
        # and version besides its value (stores/keys.py ENTRY_OVERHEAD).
        raise SystemExit(
            _usage(
                f"--max-global-value {args.max_global_value}: at most {MAX_GLOBAL_VALUE} "
                "(3.75 MiB: a global entry is replicated whole, in one message)"
            )
        )
    return MountConfig(
        swim=swim_config(args),
        mountpoint=Path(args.mountpoint),
        source=config,
        data_dir=Path(os.path.abspath(args.data_dir)),
        node=args.node,
        fuse_options=options,
        foreground=args.foreground,
        cache_timeout=args.cache_timeout,
        log_level=args.log_level,
        log_file=Path(os.path.abspath(args.log_file)) if args.log_file else None,
        stores=args.store or [],
        max_global_value=args.max_global_value,
        max_local_value=args.max_local_value,
        keyring=Path(os.path.abspath(args.keyring)) if args.keyring else None,
        tombstone_grace=args.tombstone_grace,
        poll_us=args.poll_us,
    )


def swim_config(args: argparse.Namespace) -> SwimConfig:
    """The failure detector's settings of ``drekifs mount`` ARGS; a usage error if they do not
    fit together."""
    from .daemon import SwimConfig  # here, not at the top: as in mount_config

    try:
        return SwimConfig(
            probe_interval=args.probe_interval,
            probe_timeout=args.probe_timeout,
            indirect_checks=args.indirect_checks,
            suspicion_mult=args.suspicion_mult,
        )
    except ValueError as e:
        raise SystemExit(
            _usage(
                f"--probe-interval {args.probe_interval:g}s, --probe-timeout "
                f"{args.probe_timeout:g}s: {e}"
            )
        ) from None


def cmd_mount(args: argparse.Namespace) -> int:
    # Here, not at the top: 150-200 ms, as in mount_config.
    from . import daemon

    return daemon.mount(mount_config(args))


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if path.exists() and not args.force:
        print(f"drekifs: {path} exists (--force to replace it)", file=sys.stderr)
        return EXIT_PROBLEM
    ring = KeyRing.generate()
    ring.save(path)
    print(f"{path}: new key ring, key {ring.ids()[0]} (mode 0600; copy it to every peer)")
    return 0


def cmd_keyring(args: argparse.Namespace) -> int:
    """Rotation, one step at a time, on the key ring file (peers reload it within seconds)."""
    try:
        ring = KeyRing.load(args.file)
        if args.action == "add":
            ring = ring.with_new_key()
            print(f"added key {ring.ids()[-1]} (accepted, not primary)")
        elif args.action == "primary":
            ring = ring.with_primary(_one_id(args))
            print(f"key {ring.ids()[0]} is primary")
        elif args.action == "remove":
            ring = ring.without(_one_id(args))
            print(f"removed key {args.id}")
        if args.action != "list":
            ring.save(args.file)
    except KeyRingError as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    for i, kid in enumerate(ring.ids()):
        print(f"{kid} {'primary' if i == 0 else 'accepted'}")
    return 0


def _one_id(args: argparse.Namespace) -> str:
    if not args.id:
        raise KeyRingError(f"'{args.action}' needs a key id")
    return args.id


def cmd_status(args: argparse.Namespace) -> int:
    """Members, stores, replication and world errors of a running daemon, at a glance."""
    mountpoint = Path(args.mountpoint) if args.mountpoint else _default_mount()
    status = mountpoint / ".dreki"
    try:
        rows = json.loads((status / "members.json").read_text())
    except (OSError, ValueError) as e:
        print(f"drekifs: {mountpoint}: cannot read members: {e}", file=sys.stderr)
        return EXIT_PROBLEM

    def text(name: str) -> str:
        try:
            return (status / name).read_text()
        except OSError:
            return ""

    try:
        replication = json.loads(text("replication"))
    except ValueError:
        replication = None  # a peer alone says so in words
    errors = [line for line in text("world-errors").splitlines() if line.strip()]
    if args.json:
        report = {"members": rows, "stores": text("stores").splitlines()}
        report |= {"replication": replication, "world_errors": errors}
        print(json.dumps(report, indent=1))
        return 0
    if not rows:
        print(f"{mountpoint}: this peer runs alone (mounted without --keyring)")
    else:
        table = [["NODE", "STATE", "ADDRESS", "INCARNATION", "SINCE"]]
        for r in rows:
            since = time.strftime("%H:%M:%S", time.localtime(r["since"])) if r["since"] else "-"
            name = r["node"] + (" (this peer)" if r.get("self") else "")
            table.append([name, r["state"], r["address"], str(r["incarnation"]), since])
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print()
    print("stores:")
    for line in text("stores").splitlines():
        print(f"  {line}")
    if isinstance(replication, dict):
        bc = replication.get("broadcast", {})
        print(
            f"replication: {replication.get('merged', 0)} entries merged, "
            f"{replication.get('conflicts', 0)} conflicts, "
            f"{len(bc.get('eager', []))} eager / {len(bc.get('lazy', []))} lazy neighbours, "
            f"hash tree of {replication.get('tree_keys', 0)} keys"
            + ("" if replication.get("tree_ready") else " (building)")
        )
    print(f"world errors: {len(errors)}")
    for line in errors[:10]:
        print(f"  {line}")
    return 0


def _default_mount() -> Path:
    mounts = drekifs_mounts()
    return Path(next(iter(mounts))) if mounts else Path("/dreki")


def cmd_umount(args: argparse.Namespace) -> int:
    try:
        message = unmount(Path(args.mountpoint), timeout=args.timeout)
    except MountError as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    if args.verbose:
        print(message)
    return 0


def _getxattr(path: bytes) -> bytes | None:
    try:
        return os.getxattr(path, "user.dreki.urn", follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def urn_of_path(path: str | bytes) -> URN:
    """The URN of a path on a drekifs mount, existing or not (yet).

    The nearest existing ancestor tells its URN (xattr ``user.dreki.urn``); the rest of the
    path must then be a key inside a store.
    """
    raw = os.fsencode(path)
    full = os.path.abspath(raw)
    tail: list[bytes] = []
    current = full
    while True:
        try:
            value = _getxattr(current)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise ValueError(f"{os.fsdecode(raw)} is not inside a drekifs mount") from None
            raise ValueError(f"{os.fsdecode(current)}: {os.strerror(e.errno)}") from None
        if value is not None:
            break
        parent, name = os.path.split(current)
        if parent == current:
            raise ValueError(f"{os.fsdecode(raw)} is not inside a drekifs mount")
        tail.insert(0, name)
        current = parent
    urn = URN.parse(value.decode("utf-8", "surrogateescape"))
    if not tail:
        return urn
    if urn.store is None:
        raise ValueError(
            f"{os.fsdecode(raw)}: {os.fsdecode(tail[0])!r} is no region, node or store of {urn}"
        )
    for part in tail:
        why = check_key_part(part)
        if why:
            raise ValueError(f"{os.fsdecode(raw)}: key part {os.fsdecode(part)!r} {why}")
    return URN(urn.world, urn.segments, urn.store, (*urn.key, *tail))


def cmd_urn(args: argparse.Namespace) -> int:
    try:
        urn = urn_of_path(args.path)
    except (ValueError, URNError) as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    print(urn)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    try:
        urn = URN.parse(args.urn)
    except URNError as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    mount = args.mount
    if mount is None:
        mounts = [m for m, world in drekifs_mounts().items() if world == urn.world]
        mount = mounts[0] if mounts else "/dreki"
    sys.stdout.buffer.write(urn.to_path(mount) + b"\n")
    return 0


def control_socket(urn: URN, socket_path: str | None, mount: str | None) -> str:
    """The control socket of the daemon serving ``urn``'s world: given, or that of the mount
    given, or that of the only mount of that world on this machine."""
    if socket_path:
        return socket_path
    if mount is None:
        mounts = [m for m, world in drekifs_mounts().items() if world == urn.world]
        if not mounts:
            raise ValueError(f"no drekifs mount of world {urn.world} on this machine")
        if len(mounts) > 1:
            raise ValueError(
                f"{len(mounts)} mounts of world {urn.world} ({', '.join(sorted(mounts))}):"
                " say which with --mount"
            )
        mount = mounts[0]
    try:
        return (Path(mount) / ".dreki" / "control").read_text().strip()
    except OSError as e:
        raise ValueError(f"{mount} is not a running drekifs mount: {e.strerror}") from None


def cmd_store(args: argparse.Namespace) -> int:
    """get, put, rm and ls against a running daemon."""
    try:
        urn = URN.parse(args.urn)
        sock = control_socket(urn, args.socket, args.mount)
        request: dict = {"op": args.command, "urn": args.urn}
        if args.command == "put":
            if args.value is None:
                request["value"] = sys.stdin.buffer.read()
            else:
                request["value"] = os.fsencode(args.value)
        reply = call(sock, request)
    except (URNError, ValueError) as e:
        print(f"drekifs: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except ControlError as e:
        why = os.strerror(e.errno)
        detail = str(e) if why in str(e) else f"{e} ({why})"
        print(f"drekifs: {args.command} {args.urn}: {detail}", file=sys.stderr)
        return EXIT_PROBLEM
    if args.command == "get":
        sys.stdout.buffer.write(reply["value"])
    elif args.command == "ls":
        for name, kind, size in reply["entries"]:
            line = os.fsdecode(name) + ("/" if kind == "dir" else "")
            print(f"{line}\t{size}" if args.long else line)
    return 0


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drekifs",
        description="A fleet of machines as files: the world from DNS, mounted with FUSE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "mount",
        help="mount the world",
        description="Mount the world at MOUNTPOINT. Returns once the mount serves, then runs in "
        "the background (--foreground stays attached). With no world options, serves the "
        "bundled demo world as its first node.",
    )
    add_source_options(p)
    p.add_argument(
        "--node",
        metavar="NAME",
        help="this peer's node: DNS name, name relative to the world, path, or "
        "unique label (default: the first node by DNS name)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        type=Path,
        help="where the daemon keeps its state (default: /var/lib/drekifs/WORLD/NODE as root)",
    )
    p.add_argument(
        "-o",
        metavar="OPTIONS",
        action="append",
        help="FUSE mount options, comma separated (e.g. ro, allow_other)",
    )
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay attached and log to stderr (for systemd); Ctrl-C unmounts",
    )
    p.add_argument(
        "--cache-timeout",
        type=parse_duration,
        default=3600.0,
        metavar="S",
        help="how long the kernel may cache names and attributes (changes are "
        "invalidated as they happen; default 3600)",
    )
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, type=str.upper)
    p.add_argument(
        "--log-file",
        metavar="FILE",
        help="log here (default: stderr in the foreground, DATA_DIR/drekifs.log in the background)",
    )
    p.add_argument(
        "--keyring",
        metavar="FILE",
        help="the cluster key ring (drekifs keygen); without it this peer runs alone",
    )
    p.add_argument(
        "--store",
        metavar="NAME",
        action="append",
        type=store_name,
        help="another local store of this node, beside 'local' (repeatable)",
    )
    p.add_argument(
        "--max-global-value",
        metavar="SIZE",
        type=parse_size,
        default=1 << 20,
        help="largest value of a global key (EFBIG beyond; default 1MiB)",
    )
    p.add_argument(
        "--max-local-value",
        metavar="SIZE",
        type=parse_size,
        default=64 << 20,
        help="largest value of a local key (EFBIG beyond; default 64MiB)",
    )
    p.add_argument(
        "--tombstone-grace",
        metavar="DURATION",
        type=parse_duration,
        default=TOMBSTONE_GRACE,
        help="how long a delete of a global key is remembered (default 7d; e.g. 12h, 90s)",
    )
    p.add_argument(
        "--poll-us",
        metavar="US",
        type=poll_us,
        default=100,  # fs/requestloop.py's POLL_US (importing it would load trio for every command)
        help="after answering a request, poll for the next one this many microseconds "
        "before sleeping: on a VM, waking a sleeping daemon costs each request tens of us "
        "(default 100; 0 sleeps at once)",
    )
    # The failure detector (cluster/swim/config.py has the same defaults; docs/decisions.md,
    # "Failure detection under slow peers", the measurements behind them).
    p.add_argument(
        "--probe-interval",
        metavar="SECONDS",
        type=parse_duration,
        default=1.0,
        help="probe one member this often (default 1)",
    )
    p.add_argument(
        "--probe-timeout",
        metavar="SECONDS",
        type=parse_duration,
        default=0.5,
        help="wait this long for a member's ack before asking others to ping it; under the "
        "probe interval (default 0.5)",
    )
    p.add_argument(
        "--indirect-checks",
        metavar="N",
        type=indirect_checks,
        default=3,
        help="members asked to ping a member that missed its ping (default 3)",
    )
    p.add_argument(
        "--suspicion-mult",
        metavar="X",
        type=positive_number,
        default=SUSPICION_MULT,
        help="a suspected member is declared dead after X * log10(members) probe intervals "
        f"once others confirm, 6 times that when nobody does (default {SUSPICION_MULT:g})",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="read mount options from this TOML file; flags given here override it (default: "
        "/etc/drekifs/drekifs.toml when present; see docs/configuration.md)",
    )
    p.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        nargs="?",
        help="where to mount (may come from the config file's mountpoint)",
    )
    _defer_defaults(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser(
        "umount",
        help="unmount and wait for the daemon to exit",
        description="Unmount MOUNTPOINT cleanly and wait for its daemon to exit. "
        "A stale mount (daemon killed) is removed.",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the daemon to exit (default 60)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="say what was done")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("keygen", help="write a new cluster key ring (mode 0600)")
    p.add_argument("file", help="where to write it (it holds a secret: keep it 0600)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "keyring",
        help="rotate keys: add a key, make it primary, remove the old one (see docs/operations.md)",
    )
    p.add_argument("file", help="the key ring file (peers reload it within 2 s)")
    p.add_argument(
        "action",
        choices=["list", "add", "primary", "remove"],
        help="list ids; add a key; make ID primary; remove ID (never the primary)",
    )
    p.add_argument("id", nargs="?", help="key id (for primary and remove)")
    p.set_defaults(func=cmd_keyring)

    p = sub.add_parser(
        "status", help="members, stores, replication and world errors of a running daemon"
    )
    p.add_argument("mountpoint", nargs="?", help="a drekifs mount (default: the first one)")
    p.add_argument("--json", action="store_true", help="all of it as one JSON document")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "world",
        help="print the world's tree, or check it",
        description="Read the world and print it as a tree with friendly names "
        "and node addresses. --check lists world errors and exits 1 if any.",
    )
    add_source_options(p)
    p.add_argument("--check", action="store_true", help="list world errors; exit 1 if any")
    p.add_argument("--json", action="store_true", help="print the world as JSON")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser(
        "urn",
        help="print the URN of a path",
        description="Print the URN of PATH (on a drekifs mount), alone on a line.",
    )
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_urn)

    p = sub.add_parser(
        "path",
        help="print the path of a URN",
        description="Print the path of URN below a mount point (default: the "
        "drekifs mount of that world, else /dreki).",
    )
    p.add_argument("--mount", metavar="M", help="the mount point to use")
    p.add_argument("urn", metavar="URN")
    p.set_defaults(func=cmd_path)

    for name, what in (
        ("get", "print a key's value"),
        ("put", "set a key's value (from VALUE, or standard input)"),
        ("rm", "remove a key, or an empty directory"),
        ("ls", "list a directory of a store"),
    ):
        p = sub.add_parser(
            name,
            help=what,
            description=f"{what[0].upper()}{what[1:]}, by URN, through the running daemon of "
            "that world (not through the mount).",
        )
        p.add_argument(
            "--mount",
            metavar="M",
            help="the mount whose daemon to ask (default: the only mount of the URN's world)",
        )
        p.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
        p.add_argument("urn", metavar="URN")
        if name == "put":
            p.add_argument("value", metavar="VALUE", nargs="?")
        if name == "ls":
            p.add_argument("-l", "--long", action="store_true", help="show sizes")
        p.set_defaults(func=cmd_store)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
