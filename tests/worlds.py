"""Zone files for tests: a small builder, and the worlds the tests share."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Zone:
    """Builds a zone file. Names are relative to ``origin`` unless they end with a dot."""

    origin: str = "w.test"
    ttl: int = 1
    lines: list[str] = field(default_factory=list)

    def abs(self, name: str) -> str:
        if name.endswith("."):
            return name
        return f"{name}.{self.origin}." if name != "@" else f"{self.origin}."

    def _owner(self, prefix: str, name: str) -> str:
        return f"{prefix}.{self.abs(name)}" if name != "@" else f"{prefix}.{self.origin}."

    def region(self, name: str, members: list[str], friendly: str | None = None) -> Zone:
        owner = self._owner("_dreki", name)
        if friendly:
            self.lines.append(f'{owner} IN TXT "{friendly}"')
        for m in members:
            self.lines.append(f"{owner} IN SRV 0 0 1337 {self.abs(m)}")
        return self

    def node(
        self,
        name: str,
        port: int = 7000,
        host: str = "localhost.",
        friendly: str | None = None,
        peer_id: str | None = None,
    ) -> Zone:
        self.lines.append(f"{self._owner('_node._dreki', name)} IN SRV 0 0 {port} {host}")
        if friendly:
            self.lines.append(f'{self._owner("_name._dreki", name)} IN TXT "{friendly}"')
        if peer_id:
            self.lines.append(f'{self._owner("_node._name._dreki", name)} IN TXT "{peer_id}"')
        return self

    def raw(self, line: str) -> Zone:
        self.lines.append(line)
        return self

    def text(self, serial: int = 1) -> str:
        head = [
            f"$ORIGIN {self.origin}.",
            f"$TTL {self.ttl}",
            f"@ IN SOA ns.{self.origin}. admin.{self.origin}. {serial} 3600 600 86400 {self.ttl}",
            f"@ IN NS ns.{self.origin}.",
            "ns IN A 127.0.0.1",
        ]
        return "\n".join([*head, *self.lines]) + "\n"


def small_world(origin: str = "w.test") -> Zone:
    """root -> eu -> {fr -> web1, db1}, {de -> web1}; a node listed twice (eu and fr)."""
    return (
        Zone(origin)
        .region("@", ["eu"], "Test world")
        .region("eu", ["fr.eu", "de.eu", "shared"], "Europe")
        .region("fr.eu", ["web1.fr.eu", "db1.fr.eu", "shared"], "France")
        .region("de.eu", ["web1.de.eu"], "Germany")
        .node("web1.fr.eu", 7001, friendly="Paris web")
        .node("db1.fr.eu", 7002)
        .node("web1.de.eu", 7003)
        .node("shared", 7004, friendly="Listed twice")
    )


def broken_world(origin: str = "b.test") -> Zone:
    """Every kind of world error next to a valid part.

    Valid: eu/{fr/{web1, shared}, shared}, us/{web1.a.us.b.test, web1.b.us.b.test, ok1}
    Errors: cycle (fr -> eu), dangling (ghost), reserved name (global.fr.eu),
    dot name (\\.hidden), sibling clash (two web1 under us), contradictory (both),
    malformed (nameonly: _name TXT only).
    """
    return (
        Zone(origin)
        .region("@", ["eu", "us"])
        .region("eu", ["fr.eu", "ghost.eu", "shared"])
        .region("fr.eu", ["web1.fr.eu", "eu", "global.fr.eu", "shared", "\\.hidden.fr.eu"])
        .region("us", ["web1.a.us", "web1.b.us", "ok1.us", "both.us", "nameonly.us"])
        .region("global.fr.eu", ["web1.fr.eu"])
        .region("\\.hidden.fr.eu", ["web1.fr.eu"])
        .node("web1.fr.eu", 7001)
        .node("shared", 7002)
        .node("web1.a.us", 7003)
        .node("web1.b.us", 7004)
        .node("ok1.us", 7005)
        .node("both.us", 7006)
        .region("both.us", ["ok1.us"])
        .raw('_name._dreki.nameonly.us IN TXT "no node record"')
    )


BROKEN_VALID_PATHS = {
    "eu",
    "eu/fr",
    "eu/fr/web1",
    "eu/fr/shared",
    "eu/shared",
    "us",
    "us/web1.a.us.b.test",
    "us/web1.b.us.b.test",
    "us/ok1",
    "us/both",
}
