"""The knobs of anti-entropy: how often, how long to wait, and how big a message may grow.

Sizes are msgpack bytes. The real transport carries frames of up to 4 MiB; replies are kept
under ``reply_bytes`` (2 MiB by default) so that one entry at the global value limit (1 MiB)
plus its metadata always fits, and a reply never approaches the frame limit.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class AntiEntropyConfig:
    """Timing and size bounds of :class:`~drekifs.cluster.antientropy.sync.AntiEntropy`."""

    interval: float = 20.0
    """One exchange with one random peer per interval (seconds). Broadcast spreads writes in
    well under a second; anti-entropy only repairs what it missed, so tens of seconds suffice."""
    jitter: float = 0.25
    """Each wait is ``interval * (1 ± jitter)``, so peers started together do not sync in step."""
    call_timeout: float = 30.0
    """One request/reply; a reply of ``reply_bytes`` crosses a slow WAN link well within it."""
    reply_bytes: int = 2 * MiB
    """What a reply (child hashes, leaf listings, exported entries) may weigh, about."""
    request_bytes: int = 2 * MiB
    """What a request (keys to export, entries to merge) may weigh, about; the same bound is
    enforced on requests received, so a peer can never be asked to buffer more."""
    max_items: int = 65_536
    """Node ids, bucket ids or keys in one request: a cheap bound checked before any work."""
    max_key_bytes: int = 8192
    """A longer key in a message is malformed (store keys are at most about 4 KiB)."""
    export_batch: int = 64
    """Keys handed to ``EntrySource.export`` at a time while a reply is filled: small, so the
    entries read past the reply's budget (and thrown away) stay few."""
    full_sync_rounds: int = 4
    """``full_sync`` repeats the exchange until both roots agree, at most this many times
    (writes landing during an exchange can leave a small difference behind)."""
