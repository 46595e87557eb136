"""Admission's decisions (cluster/admission.py), without sockets: handshakes evict the oldest,
authenticated connections are counted per peer and never against handshakes."""

from __future__ import annotations

import random

from drekifs.cluster.admission import (
    EVICTED,
    GONE,
    OVER_HOST,
    OVER_PEER,
    OVER_TOTAL,
    Admission,
)
from drekifs.cluster.limits import Limits

LIMITS = Limits(
    max_handshakes=10,
    max_handshakes_per_host=4,
    max_conns=6,
    max_conns_per_host=4,
    max_conns_per_peer=2,
)


def test_a_full_address_evicts_its_own_oldest_handshake() -> None:
    adm = Admission(LIMITS)
    first = [adm.arrive("10.0.0.1")[0] for _ in range(4)]
    others = [adm.arrive("10.0.0.2")[0] for _ in range(3)]
    new, evicted = adm.arrive("10.0.0.1")
    assert evicted is first[0] and evicted.state == GONE
    assert adm.handshakes() == 7
    # The newest from that address still authenticates; the others' were never touched.
    assert adm.authenticate(new, ("10.0.0.1", 7000)) is None
    assert all(t.state != GONE for t in others)


def test_a_full_budget_evicts_the_oldest_of_all() -> None:
    adm = Admission(LIMITS)
    tickets = [adm.arrive(f"10.0.1.{i}")[0] for i in range(10)]
    new, evicted = adm.arrive("10.0.2.1")
    assert evicted is tickets[0]
    assert adm.handshakes() == 10
    assert adm.authenticate(new, ("10.0.2.1", 7000)) is None
    assert adm.authenticate(evicted, ("10.0.1.0", 7000)) == EVICTED


def test_handshakes_never_count_against_authenticated_peers() -> None:
    adm = Admission(LIMITS)
    # A flood of handshakes from the peer's own address and from everywhere else...
    for i in range(1000):
        adm.arrive("127.0.0.1" if i % 3 == 0 else f"127.0.{i % 7}.{i % 11}")
    # ...and a real client arriving after it authenticates at once.
    ticket, _ = adm.arrive("127.0.0.1")
    assert adm.authenticate(ticket, ("127.0.0.1", 7000)) is None
    assert adm.authenticated() == 1


def test_peers_sharing_an_address_are_counted_apart() -> None:
    adm = Admission(LIMITS)
    for port in range(7000, 7004):  # four nodes behind one address, one connection each
        t, _ = adm.arrive("192.0.2.1")
        assert adm.authenticate(t, ("192.0.2.1", port)) is None
    # The address is at max_conns_per_host: a hostile peer declaring yet another port is out.
    t, _ = adm.arrive("192.0.2.1")
    assert adm.authenticate(t, ("192.0.2.1", 7100)) == OVER_HOST


def test_one_peer_is_bounded() -> None:
    adm = Admission(LIMITS)
    peer = ("192.0.2.1", 7000)
    for _ in range(2):
        assert adm.authenticate(adm.arrive("192.0.2.1")[0], peer) is None
    t, _ = adm.arrive("192.0.2.1")
    assert adm.authenticate(t, peer) == OVER_PEER and t.state == GONE
    assert adm.authenticated() == 2 and adm.handshakes() == 0


def test_the_total_of_authenticated_connections_is_bounded() -> None:
    adm = Admission(LIMITS)
    held = []
    for i in range(6):
        t, _ = adm.arrive(f"192.0.2.{i}")
        assert adm.authenticate(t, (f"192.0.2.{i}", 7000)) is None
        held.append(t)
    t, _ = adm.arrive("192.0.2.100")
    assert adm.authenticate(t, ("192.0.2.100", 7000)) == OVER_TOTAL
    adm.leave(held[0])
    adm.leave(held[0])  # idempotent
    t, _ = adm.arrive("192.0.2.100")
    assert adm.authenticate(t, ("192.0.2.100", 7000)) is None


def test_evict_oldest_frees_a_handshake() -> None:
    adm = Admission(LIMITS)
    assert adm.evict_oldest() is None
    a, _ = adm.arrive("10.0.0.1")
    adm.arrive("10.0.0.2")
    assert adm.evict_oldest() is a and adm.handshakes() == 1


def test_random_traffic_keeps_the_counts_right() -> None:
    """Counts equal what is held, and no budget is ever exceeded, whatever the order."""
    rng = random.Random(17)
    adm = Admission(LIMITS)
    live = []
    for _ in range(5000):
        op = rng.random()
        if op < 0.5:
            t, evicted = adm.arrive(f"10.0.0.{rng.randrange(4)}")
            live.append(t)
            if evicted is not None:
                assert evicted in live and evicted.state == GONE
        elif op < 0.8 and live:
            t = rng.choice(live)
            adm.authenticate(t, (t.host, 7000 + rng.randrange(3)))
        elif live:
            t = live.pop(rng.randrange(len(live)))
            adm.leave(t)
        live = [t for t in live if t.state != GONE]
        shaking = [t for t in live if t.state == "handshake"]
        authed = [t for t in live if t.state == "authenticated"]
        assert adm.handshakes() == len(shaking) <= LIMITS.max_handshakes
        assert adm.authenticated() == len(authed) <= LIMITS.max_conns
        for host in {t.host for t in shaking}:
            assert sum(t.host == host for t in shaking) <= LIMITS.max_handshakes_per_host
        for peer in {t.peer for t in authed}:
            assert sum(t.peer == peer for t in authed) <= LIMITS.max_conns_per_peer


def test_limits_fitted_to_few_descriptors_shrink_handshakes_first() -> None:
    assert Limits().fitted(100_000) == Limits()
    fitted = Limits().fitted(2000)
    assert fitted.max_conns == 1024 and fitted.max_handshakes == 2000 - 1024
    tiny = Limits().fitted(500)
    assert tiny.max_handshakes == 64 and tiny.max_conns == 436
    assert tiny.max_conns_per_host == 256 and tiny.max_handshakes_per_host == 64
