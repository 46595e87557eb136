"""What a transport knows of the transports it sends datagrams to: the instance each address
answers with, and what waits for it to be known. Pure: no sockets; time from a clock given.

A datagram is sealed for its receiver's *instance* (8 random bytes a transport draws when it
starts, frames.py), so a sender needs the instance before it can send. To an address whose
instance it does not know, the transport sends a HELLO and queues the message (``wait``); the
WELCOME that answers names the instance and releases the queue (``welcomed``). A peer that
restarted answers DATA sealed for its previous life with a RETRY echoing the DATA's id:
``retried`` finds where that DATA went and forgets the outdated instance; a new HELLO follows,
and the message goes again once it is answered, so a restart loses no datagram. A HELLO also
tells its receiver the instance of its sender (``heard``), so the answers a new peer provokes
need no HELLO of their own.

Bindings are by the address the sender used, never by the address an answer came from: a
WELCOME or RETRY counts only when it echoes an id this transport sent (a HELLO's, a DATA's) and
remembers, so a peer listening on several addresses, or reached through a NAT, is learnt under
the address it is sent to. Every table is bounded; when full, the oldest entry goes.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .net import PeerAddr

KNOWN = 4096  # addresses whose instance is remembered (a cluster's peers, with room)
WAITING = 1024  # addresses with a HELLO outstanding
QUEUE = 8  # messages kept per waiting address; older ones are dropped first
QUEUED_FOR = 5.0  # seconds a queued message stays worth sending (a probe's answer is late by then)
HELLO_EVERY = 0.25  # seconds before a HELLO unanswered is sent again (when there is news)
HELLOS_KEPT = 8  # ids of HELLOs to one address whose WELCOME still counts (a slow peer's)
SENT_KEPT = 1024  # DATA sent that a RETRY may echo (it comes within a round trip)


@dataclass
class _Waiting:
    hello_at: float
    hello_ids: deque[int] = field(default_factory=lambda: deque(maxlen=HELLOS_KEPT))
    queue: deque[tuple[float, bytes]] = field(default_factory=lambda: deque(maxlen=QUEUE))


class Receivers:
    def __init__(
        self,
        counters: Counter[str],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self._mono = monotonic
        # Ordered, so that the oldest goes first when full, in O(1) (a dict's first key is slow
        # to find once many at its front were deleted: it walks past their slots).
        self._known: OrderedDict[PeerAddr, tuple[bytes, int]] = OrderedDict()  # (instance, ms)
        self._waiting: OrderedDict[PeerAddr, _Waiting] = OrderedDict()
        self._hellos: dict[int, PeerAddr] = {}  # HELLO id -> where it went
        # DATA id -> (where, the instance it was sealed for, its message)
        self._sent: dict[int, tuple[PeerAddr, bytes, bytes]] = {}
        self._sent_order: deque[int] = deque()  # their ids, oldest first

    def known(self) -> int:
        return len(self._known)

    def waiting(self) -> int:
        return len(self._waiting)

    def instance(self, addr: PeerAddr) -> bytes | None:
        entry = self._known.get(addr)
        return None if entry is None else entry[0]

    def sent(self, ident: int, addr: PeerAddr, instance: bytes, body: bytes) -> None:
        """A DATA of ``body`` went to ``addr`` sealed for ``instance``: a RETRY echoing it may
        follow, and then ``body`` goes again, to the new instance."""
        order = self._sent_order
        if len(order) >= SENT_KEPT:
            self._sent.pop(order.popleft(), None)
        order.append(ident)
        self._sent[ident] = (addr, instance, body)

    def wait(self, addr: PeerAddr, body: bytes | None, hello_id: int) -> bool:
        """Queue ``body`` (if any) for ``addr``, whose instance is not known; True when a HELLO
        with ``hello_id`` is to be sent now (none yet, or the last is HELLO_EVERY old)."""
        now = self._mono()
        waiting = self._waiting.get(addr)
        if waiting is None:
            if len(self._waiting) >= WAITING:
                evicted = self._drop_waiting(next(iter(self._waiting)))  # the oldest
                self.counters["udp.queue-dropped"] += len(evicted.queue) if evicted else 0
            waiting = self._waiting[addr] = _Waiting(now - HELLO_EVERY)
        if body is not None:
            if len(waiting.queue) == QUEUE:
                self.counters["udp.queue-dropped"] += 1
            waiting.queue.append((now, body))
            self.counters["udp.queued"] += 1
        if now - waiting.hello_at < HELLO_EVERY:
            return False
        waiting.hello_at = now
        if len(waiting.hello_ids) == HELLOS_KEPT:
            self._hellos.pop(waiting.hello_ids[0], None)
        waiting.hello_ids.append(hello_id)
        self._hellos[hello_id] = addr
        return True

    def welcomed(
        self, echo: int, instance: bytes, sent_ms: int
    ) -> tuple[PeerAddr, list[bytes]] | None:
        """A WELCOME answered the HELLO ``echo``: where it went, and the messages to send it
        now; None when no HELLO of ours has that id (late, or not ours)."""
        addr = self._hellos.get(echo)
        if addr is None:
            return None
        self._learn(addr, instance, sent_ms)
        return addr, self._release(addr)

    def heard(self, addr: PeerAddr, instance: bytes, sent_ms: int) -> list[bytes]:
        """A HELLO from ``addr`` names its sender's instance: learnt unless what we know came
        later (an older HELLO replayed). The messages to send it now."""
        known = self._known.get(addr)
        if known is not None and known[1] >= sent_ms:
            return []
        self._learn(addr, instance, sent_ms)
        return self._release(addr)

    def retried(self, echo: int) -> tuple[PeerAddr, bytes] | None:
        """A RETRY says the DATA ``echo`` found another instance there: the address it went to,
        whose instance is forgotten (unless learnt anew since), and its message, to send again;
        None if we sent no such DATA (or too long ago)."""
        entry = self._sent.pop(echo, None)
        if entry is None:
            return None
        addr, instance, body = entry
        known = self._known.get(addr)
        if known is not None and known[0] == instance:
            del self._known[addr]
            self.counters["udp.receiver-restarted"] += 1
        return addr, body

    # -- the tables -----------------------------------------------------------------------------

    def _learn(self, addr: PeerAddr, instance: bytes, sent_ms: int) -> None:
        known = self._known
        if addr not in known and len(known) >= KNOWN:
            known.popitem(last=False)
        known[addr] = (instance, sent_ms)

    def _release(self, addr: PeerAddr) -> list[bytes]:
        waiting = self._drop_waiting(addr)
        if waiting is None:
            return []
        fresh = self._mono() - QUEUED_FOR
        out = [body for at, body in waiting.queue if at >= fresh]
        self.counters["udp.queue-expired"] += len(waiting.queue) - len(out)
        return out

    def _drop_waiting(self, addr: PeerAddr) -> _Waiting | None:
        waiting = self._waiting.pop(addr, None)
        if waiting is not None:
            for ident in waiting.hello_ids:
                self._hellos.pop(ident, None)
        return waiting
