"""Datagrams bind their receiver (issue 17): sealed for one transport's instance, they do not
reach another transport, nor the same port after a restart. Real transports on 127.0.0.1, and
the pure bookkeeping of receivers.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import trio

from drekifs.cluster import frames, receivers
from drekifs.cluster.keyring import KeyRing
from drekifs.cluster.net import SEAL_OVERHEAD
from drekifs.cluster.receivers import Receivers
from drekifs.cluster.transport import DATAGRAM_OVERHEAD, Transport

from .test_transport import FAST, WORLD, Wiretap, eventually, free_port, replay, start


def inbox(t: Any) -> list[Any]:
    got: list[Any] = []
    t.on_datagram(lambda src, msg: got.append(msg))
    return got


async def test_a_datagram_sealed_for_one_peer_does_not_reach_another(nursery) -> None:
    ring = KeyRing.generate()
    a, b, c = [await start(nursery, ring) for _ in range(3)]
    got_b, got_c = inbox(b), inbox(c)
    tap = Wiretap(b.addr)
    await nursery.start(tap.run)
    a.send_datagram(tap.addr, {"t": "gossip", "u": ["c is dead"]})
    await eventually(lambda: got_b, "the datagram at b")
    [captured] = tap.data()
    await replay(captured, c.addr)
    await eventually(lambda: c.counters["udp.dropped.misdirected"] == 1, "the drop at c")
    # Never handed on: the handler (SWIM) saw nothing, not even to apply gossip.
    assert got_c == [] and c.counters["udp.received"] == 0
    assert c.counters["udp.retry.sent"] == 1  # to the source, which is no sender of ours
    # Replayed again, it is a replay: one RETRY per captured datagram at most.
    await replay(captured, c.addr)
    await eventually(lambda: c.counters["udp.dropped.replay"] == 1, "the second drop")
    assert c.counters["udp.retry.sent"] == 1


async def test_a_datagram_captured_before_a_restart_is_refused_after_it(nursery) -> None:
    ring = KeyRing.generate()
    port = free_port()
    a, b = await start(nursery, ring), await start(nursery, ring, port=port)
    got_b = inbox(b)
    tap = Wiretap(b.addr)
    await nursery.start(tap.run)
    a.send_datagram(tap.addr, "before")
    await eventually(lambda: got_b == ["before"], "the datagram")
    [captured] = tap.data()
    await b.aclose()
    b2 = await start(nursery, ring, port=port)  # the same address, a new life
    got_b2 = inbox(b2)
    await replay(captured, b2.addr)
    await eventually(lambda: b2.counters["udp.dropped.misdirected"] == 1, "the drop")
    assert got_b2 == []
    # a still holds b's old instance: its next datagram is refused too, and the RETRY that
    # answers it makes a learn the new one and send it again: nothing lost.
    a.send_datagram(tap.addr, "after")
    await eventually(lambda: got_b2 == ["after"], "the datagram, sent again")
    assert a.counters["udp.receiver-restarted"] == 1
    assert b2.counters["udp.dropped.misdirected"] == 2
    a.send_datagram(tap.addr, "and on")
    await eventually(lambda: got_b2 == ["after", "and on"], "the next one")


async def test_a_hello_teaches_its_receiver_who_sent_it(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    got_a, got_b = inbox(a), inbox(b)
    a.send_datagram(b.addr, "ping")
    await eventually(lambda: got_b == ["ping"], "the ping")
    b.send_datagram(a.addr, "ack")  # b learnt a's instance from a's HELLO: no HELLO of its own
    await eventually(lambda: got_a == ["ack"], "the ack")
    assert a.counters["udp.hello.sent"] == 1 and b.counters["udp.hello.sent"] == 0


async def test_a_peer_on_every_address_is_reached_under_each_one(nursery) -> None:
    # Instances are learnt under the address the sender used, whatever address answers.
    ring = KeyRing.generate()
    a = await start(nursery, ring)
    b = Transport(WORLD, ring, ("0.0.0.0", 0), limits=FAST)
    await nursery.start(b.serve)
    got_b = inbox(b)
    port = b.addr[1]
    for alias in ("127.0.0.1", "127.0.0.2"):
        a.send_datagram((alias, port), alias)
    await eventually(lambda: sorted(got_b) == ["127.0.0.1", "127.0.0.2"], "both datagrams")
    assert a.stats()["datagram_receivers"] == {"known": 2, "waiting": 0}
    assert b.counters["udp.dropped.misdirected"] == 0


async def test_a_hello_replayed_is_answered_once(nursery) -> None:
    ring = KeyRing.generate()
    a, b = await start(nursery, ring), await start(nursery, ring)
    inbox(b)
    tap = Wiretap(b.addr)
    await nursery.start(tap.run)
    a.send_datagram(tap.addr, "hi")
    await eventually(lambda: b.counters["udp.received"] == 1, "the datagram")
    hello = tap.captured[0]
    assert hello[0] == frames.HELLO
    await replay(hello, b.addr, times=2)
    await eventually(lambda: b.counters["udp.dropped.replay"] == 2, "the replays")
    assert b.counters["udp.welcome.sent"] == 1


async def test_messages_wait_for_the_welcome_and_a_silent_address_holds_few(nursery) -> None:
    ring = KeyRing.generate()
    a = await start(nursery, ring)
    nobody = ("127.0.0.1", free_port())
    for i in range(3 * receivers.QUEUE):
        a.send_datagram(nobody, i)
    assert a.counters["udp.sent"] == 0 and a.counters["udp.hello.sent"] == 1
    assert a.counters["udp.queue-dropped"] == 2 * receivers.QUEUE
    assert a.stats()["datagram_receivers"] == {"known": 0, "waiting": 1}


def test_the_overhead_the_protocols_budget_for_is_the_transports() -> None:
    assert SEAL_OVERHEAD == DATAGRAM_OVERHEAD


# -- the bookkeeping, alone --------------------------------------------------------------------

B = ("10.0.0.2", 4000)
C = ("10.0.0.3", 4000)
OLD, NEW = b"\x01" * 8, b"\x02" * 8


class Book:
    def __init__(self) -> None:
        self.now = 100.0
        self.counters: Counter[str] = Counter()
        self.r = Receivers(self.counters, monotonic=lambda: self.now)


def test_a_welcome_counts_only_for_a_hello_of_ours_and_releases_the_queue() -> None:
    book = Book()
    r = book.r
    assert r.wait(B, b"m1", hello_id=11)
    book.now += 0.1
    assert not r.wait(B, b"m2", hello_id=12)  # a HELLO is out: no other yet
    book.now += receivers.HELLO_EVERY
    assert r.wait(B, None, hello_id=13)  # unanswered for long enough: again
    assert r.welcomed(99, NEW, 1) is None  # not an id of ours
    assert r.instance(B) is None
    # The first HELLO's answer still counts (a slow peer answers late).
    assert r.welcomed(11, NEW, 1) == (B, [b"m1", b"m2"])
    assert r.instance(B) == NEW and r.waiting() == 0
    assert r.welcomed(13, OLD, 2) is None  # answered already: its ids are gone


def test_queued_messages_expire() -> None:
    book = Book()
    book.r.wait(B, b"old", hello_id=1)
    book.now += receivers.QUEUED_FOR + 1
    book.r.wait(B, b"new", hello_id=2)
    assert book.r.welcomed(2, NEW, 1) == (B, [b"new"])
    assert book.counters["udp.queue-expired"] == 1


def test_a_hello_heard_teaches_unless_a_later_one_did() -> None:
    r = Book().r
    assert r.heard(B, NEW, sent_ms=2000) == []
    assert r.heard(B, OLD, sent_ms=1000) == []  # an older HELLO, replayed
    assert r.instance(B) == NEW
    r.wait(C, b"m", hello_id=5)
    assert r.heard(C, OLD, sent_ms=1) == [b"m"] and r.waiting() == 0


def test_a_retry_forgets_the_instance_its_data_was_sealed_for_only() -> None:
    book = Book()
    r = book.r
    r.heard(B, OLD, 1)
    r.sent(7, B, OLD, b"m7")
    r.sent(8, B, OLD, b"m8")
    assert r.retried(999) is None  # no DATA of ours
    assert r.retried(7) == (B, b"m7") and r.instance(B) is None
    r.heard(B, NEW, 2)
    assert r.retried(8) == (B, b"m8") and r.instance(B) == NEW  # learnt anew since: kept
    assert r.retried(8) is None  # each id once
    assert book.counters["udp.receiver-restarted"] == 1


def test_every_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("KNOWN", 4), ("WAITING", 3), ("SENT_KEPT", 5), ("HELLOS_KEPT", 2)):
        monkeypatch.setattr(receivers, name, value)
    book = Book()
    r = book.r
    for i in range(10):
        addr = ("10.1.0.1", i)
        r.heard(addr, NEW, 1)
        r.wait(("10.2.0.1", i), b"m", hello_id=i)
        r.sent(i, addr, NEW, b"m")
    assert r.known() == 4 and r.waiting() == 3 and len(r._sent) == 5
    assert len(r._hellos) == 3 and book.counters["udp.queue-dropped"] == 7
    assert r.retried(0) is None and r.retried(9) == (("10.1.0.1", 9), b"m")
    for _ in range(5):  # one address, HELLO after HELLO unanswered
        book.now += receivers.HELLO_EVERY
        r.wait(B, None, hello_id=1000 + len(r._hellos) + int(book.now * 100))
    assert sum(1 for a in r._hellos.values() if a == B) == 2


async def test_a_datagram_of_version_1_is_junk(nursery) -> None:
    ring = KeyRing.generate()
    b = await start(nursery, ring)
    v1 = ring.seal(frames.pack([0, 1, "hi"]), frames.datagram_aad(b"inf.random.sh"))
    await replay(v1, b.addr)
    await eventually(lambda: b.counters["udp.dropped.junk"] == 1, "the drop")
    with trio.fail_after(1):
        assert b.counters["udp.received"] == 0
