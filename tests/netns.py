"""Hosts for multi-host tests: network namespaces on one bridge, made and removed by the test.

Each host is a network namespace with a veth to a bridge in its own namespace, an address in
10.77.x.0/24, and nothing else: traffic never leaves these namespaces. Loss is made with nftables
(``numgen random``), partitions with nftables drops; delay with tc netem where the kernel has it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return result


def have_netns() -> str | None:
    """Why multi-host tests cannot run here, or None."""
    if os.getuid() != 0:
        return "not root"
    for tool in ("ip", "nft", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed"
    return None


@dataclass
class Hosts:
    tag: str  # short, unique per test run (interface names are at most 15 bytes)
    subnet: int = 77
    names: list[str] = field(default_factory=list)
    netem: bool | None = None

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-br"

    def ip(self, i: int) -> str:
        return f"10.{self.subnet}.0.{i + 1}"

    def ns(self, i: int) -> str:
        return f"{self.tag}-h{i}"

    def create(self, n: int) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i in range(n):
            ns = self.ns(i)
            sh("ip", "netns", "add", ns)
            self.names.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # The veth is born in the host's namespace, then both ends move at once.
            a, b = f"{self.tag}a{i}", f"{self.tag}b{i}"
            sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", a, "netns", ns)
            sh("ip", "link", "set", b, "netns", self.bridge_ns)
            sh("ip", "-n", ns, "link", "set", a, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.bridge_ns, "link", "set", b, "master", "br0")
            sh("ip", "-n", self.bridge_ns, "link", "set", b, "up")
            sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "dk")
            sh(
                "ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "dk", "in",
                "{ type filter hook input priority 0 ; }",
            )  # fmt: skip

    def destroy(self) -> None:
        for ns in [*self.names, self.bridge_ns]:
            sh("ip", "netns", "del", ns, check=False)
        self.names.clear()

    def exec(self, i: int, *cmd: str) -> list[str]:
        """Run in host ``i``'s network namespace only. (``ip netns exec`` would also give the
        command a mount namespace of its own, where a FUSE mount is invisible to the test.)"""
        return ["nsenter", f"--net=/var/run/netns/{self.ns(i)}", *cmd]

    def loss(self, i: int, percent: int) -> None:
        """Drop ``percent`` % of what host ``i`` receives."""
        sh(*self.exec(i, "nft", "add", "rule", "inet", "dk", "in",
                      "numgen", "random", "mod", "100", "<", str(percent), "drop"))  # fmt: skip

    def delay(self, i: int, ms: int) -> bool:
        """tc netem delay on host ``i``'s interface; False when the kernel has no netem."""
        r = sh(*self.exec(i, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                          "delay", f"{ms}ms"), check=False)  # fmt: skip
        self.netem = r.returncode == 0
        return self.netem

    def cut(self, i: int, j: int) -> None:
        """Host ``i`` no longer hears host ``j`` (both ways: call it twice for a partition)."""
        sh(*self.exec(i, "nft", "add", "rule", "inet", "dk", "in",
                      "ip", "saddr", self.ip(j), "drop"))  # fmt: skip

    def heal(self, i: int) -> None:
        sh(*self.exec(i, "nft", "flush", "chain", "inet", "dk", "in"))
