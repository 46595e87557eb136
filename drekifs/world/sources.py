"""Where the records come from: a zone file, or real DNS servers.

Both answer :class:`~drekifs.world.resolve.Query` objects with
:class:`~drekifs.world.resolve.Answer` objects, and both raise
:class:`~drekifs.world.resolve.SourceError` when they cannot answer at all; the resolver never
sees dnspython types.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.zone
import trio

from .model import Address, World
from .resolve import (
    NODATA,
    NXDOMAIN,
    OK,
    Answer,
    Query,
    SourceError,
    SrvRecord,
    resolve,
    resolve_sync,
)

MAX_CNAME_CHAIN = 8


def _name_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


def _records(rdtype: str, rdataset: Iterable) -> tuple:
    if rdtype == "SRV":
        return tuple(
            SrvRecord(
                rd.priority,
                rd.weight,
                rd.port,
                _name_text(rd.target),
                rd.target.labels[0].lower() if rd.target.labels[:1] != (b"",) else b"",
            )
            for rd in rdataset
        )
    return tuple(b"".join(rd.strings) for rd in rdataset)


# -- zone files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneStamp:
    """What tells a zone file changed, without reading it."""

    mtime_ns: int
    size: int
    inode: int


def zone_stamp(path: str | os.PathLike) -> ZoneStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ZoneStamp(st.st_mtime_ns, st.st_size, st.st_ino)


def read_zone(path: str | os.PathLike, world: str | None = None) -> dns.zone.Zone:
    """Parse a zone file; the world is ``world`` or the file's own $ORIGIN."""
    origin = dns.name.from_text(world) if world else None
    try:
        return dns.zone.from_file(
            os.fspath(path), origin=origin, relativize=False, check_origin=False
        )
    except FileNotFoundError:
        raise SourceError(f"zone file {path} does not exist") from None
    except dns.zone.UnknownOrigin:
        raise SourceError(
            f"zone file {path} has no $ORIGIN: give the world's domain with --world"
        ) from None
    except (dns.exception.DNSException, UnicodeDecodeError, OSError) as e:
        message = str(e)  # dnspython's own messages start with "FILE:LINE:"
        prefix = "zone file " if message.startswith(os.fspath(path)) else f"zone file {path}: "
        raise SourceError(prefix + message) from None


def zone_origin(zone: dns.zone.Zone) -> str:
    return _name_text(zone.origin)


class ZoneAnswers:
    """Answers queries from a parsed zone, following CNAMEs inside it."""

    def __init__(self, zone: dns.zone.Zone) -> None:
        self.zone = zone

    def __call__(self, q: Query) -> Answer:
        name = dns.name.from_text(q.name)
        rdtype = dns.rdatatype.from_text(q.rdtype)
        for _ in range(MAX_CNAME_CHAIN):
            if not name.is_subdomain(self.zone.origin):
                return Answer(NXDOMAIN)
            node = self.zone.get_node(name)
            if node is None:
                return Answer(NXDOMAIN)
            rds = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rds is not None:
                return Answer(OK, _records(q.rdtype, rds))
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                return Answer(NODATA)
            name = cname[0].target
        raise SourceError(f"CNAME chain from {q.name} longer than {MAX_CNAME_CHAIN}")


def world_from_zone(path: str | os.PathLike, world: str | None = None, **kw) -> World:
    zone = read_zone(path, world)
    return resolve_sync(zone_origin(zone), ZoneAnswers(zone), **kw)


# -- DNS servers --------------------------------------------------------------------------------


def system_servers() -> list[tuple[str, int]]:
    try:
        resolver = dns.resolver.Resolver()
    except dns.resolver.NoResolverConfiguration as e:
        raise SourceError(f"no system resolver configured: {e}") from None
    return [(str(ns), resolver.port) for ns in resolver.nameservers]


class DnsAnswers:
    """Asks real DNS servers (recursive or authoritative), UDP first, TCP when truncated.

    A server that times out, fails or refuses is skipped for the next one; when none answers,
    :class:`SourceError`. NXDOMAIN and empty answers are answers, with their negative TTL.
    """

    def __init__(
        self, servers: list[tuple[str, int]] | None = None, timeout: float = 2.0, tries: int = 2
    ) -> None:
        self.servers = servers or system_servers()
        self.timeout = timeout
        self.tries = tries

    async def __call__(self, q: Query) -> Answer:
        request = dns.message.make_query(q.name + ".", q.rdtype, want_dnssec=False)
        problems: list[str] = []
        for _ in range(self.tries):
            for host, port in self.servers:
                try:
                    response = await dns.asyncquery.udp(
                        request, host, timeout=self.timeout, port=port, ignore_unexpected=True
                    )
                    if response.flags & dns.flags.TC:
                        response = await dns.asyncquery.tcp(
                            request, host, timeout=self.timeout, port=port
                        )
                except (dns.exception.DNSException, OSError) as e:
                    problems.append(f"{Address(host, port)}: {type(e).__name__} {e}".strip())
                    continue
                rcode = response.rcode()
                if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    problems.append(f"{Address(host, port)}: {dns.rcode.to_text(rcode)}")
                    continue
                try:
                    chain = response.resolve_chaining()
                except dns.exception.DNSException as e:
                    problems.append(f"{Address(host, port)}: {e}")
                    continue
                if chain.answer is not None:
                    return Answer(OK, _records(q.rdtype, chain.answer), chain.minimum_ttl)
                status = NXDOMAIN if rcode == dns.rcode.NXDOMAIN else NODATA
                return Answer(status, (), chain.minimum_ttl)
        reasons = "; ".join(problems[-3:])
        raise SourceError(f"no DNS server answered {q.name} {q.rdtype}: {reasons}")


async def world_from_dns(domain: str, answers: DnsAnswers, concurrency: int = 32, **kw) -> World:
    """Resolve over DNS, one breadth-first level at a time, ``concurrency`` queries in flight."""
    limiter = trio.CapacityLimiter(concurrency)
    gen = resolve(domain, **kw)

    async def ask(q: Query, out: dict[Query, Answer]) -> None:
        async with limiter:
            out[q] = await answers(q)

    try:
        queries = next(gen)
        while True:
            got: dict[Query, Answer] = {}
            async with trio.open_nursery() as nursery:
                for q in queries:
                    nursery.start_soon(ask, q, got)
            queries = gen.send(got)
    except StopIteration as stop:
        return stop.value
    except BaseExceptionGroup as group:
        # A SourceError from any query fails the whole resolution, with the first reason.
        source = group.subgroup(SourceError)
        if source is not None:
            raise _first(source) from None
        raise


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe_source(zone: str | Path | None, servers: list[tuple[str, int]] | None) -> str:
    if zone:
        return f"zone file {zone}"
    if servers:
        return "DNS " + ", ".join(str(Address(h, p)) for h, p in servers)
    return "the system resolver"
