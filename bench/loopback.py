"""Peers of one world on 127.0.0.1, for the benchmarks that mount several: free ports and the
zone that gives each node one (each node's SRV target is localhost, on its own port)."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterable
from pathlib import Path


def free_port() -> int:
    """A UDP port free now on 127.0.0.1 (a peer binds TCP and UDP on the port of its SRV)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zone(domain: str, ports: dict[str, int]) -> str:
    """A zone file of ``domain`` with one region, ``dc``, holding a node per entry of ``ports``
    (node name -> its port)."""
    lines = [
        f"$ORIGIN {domain}.",
        "$TTL 60",
        f"@ IN SOA ns.{domain}. admin.{domain}. 1 3600 600 86400 60",
        f"@ IN NS ns.{domain}.",
        "ns IN A 127.0.0.1",
        f"_dreki IN SRV 0 0 1337 dc.{domain}.",
    ]
    for n, port in ports.items():
        lines.append(f"_dreki.dc IN SRV 0 0 1337 {n}.{domain}.")
        lines.append(f"_node._dreki.{n} IN SRV 0 0 {port} localhost.")
    return "\n".join(lines) + "\n"


def keep_logs(work: Path, nodes: Iterable[str], dest: str | None) -> None:
    """Copy each node's daemon log (``work/d<node>/drekifs.log``) to ``dest/<node>.log``."""
    if not dest:
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    for n in nodes:
        log = work / f"d{n}" / "drekifs.log"
        if log.exists():
            shutil.copy(log, Path(dest) / f"{n}.log")
