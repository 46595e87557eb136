"""Keeping the world current: resolve, fall back to the last good world, refresh in the background.

A zone file is polled for changes (its mtime, size and inode) every ``poll`` seconds. DNS is
asked again when the smallest TTL of the records read runs out (within ``[min_refresh,
max_refresh]``), and after a failure with a backoff; meanwhile the last good world is served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import snapshot as snapshots
from .model import World
from .resolve import SourceError
from .sources import DnsAnswers, describe_source, world_from_dns, world_from_zone, zone_stamp

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Where the world comes from. Exactly one of ``zone`` and DNS (``servers``, or None for the
    system resolver) is used; ``domain`` may be None only with a zone file (its $ORIGIN)."""

    domain: str | None = None
    zone: Path | None = None
    servers: list[tuple[str, int]] | None = None
    min_refresh: float = 1.0
    max_refresh: float = 300.0
    poll: float = 1.0
    dns_timeout: float = 2.0
    reserved: frozenset[str] = field(default_factory=lambda: frozenset({"global", "local"}))

    def describe(self) -> str:
        return describe_source(self.zone, self.servers)


async def fetch_world(config: SourceConfig) -> World:
    """Resolve once. Raises :class:`SourceError` when the source cannot answer."""
    if config.zone is not None:
        # Parsing a big zone takes a while: off the event loop.
        return await trio.to_thread.run_sync(
            lambda: world_from_zone(config.zone, config.domain, reserved=config.reserved)
        )
    if not config.domain:
        raise SourceError("resolving over DNS needs the world's domain (--world)")
    answers = DnsAnswers(config.servers, timeout=config.dns_timeout)
    return await world_from_dns(config.domain, answers, reserved=config.reserved)


class WorldWatcher:
    """Holds the current :class:`~drekifs.world.snapshot.Snapshot` and keeps it fresh.

    ``on_change(old, new)`` is called (synchronously, from the watcher's task) whenever the tree
    or its errors change. ``source_error`` says why the last refresh failed, or None.
    """

    def __init__(
        self,
        config: SourceConfig,
        data_dir: Path | None,
        on_change: Callable[[snapshots.Snapshot | None, snapshots.Snapshot], None] | None = None,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.on_change = on_change
        self.snapshot: snapshots.Snapshot | None = None
        self.source_error: str | None = None
        self.refreshes = 0
        self._stamp = None

    @property
    def world(self) -> World:
        assert self.snapshot is not None, "load() first"
        return self.snapshot.world

    async def load(self) -> snapshots.Snapshot:
        """The first world: from the source, else the last good one on disk, else SourceError."""
        stored = snapshots.load(self.data_dir) if self.data_dir else None
        if stored is not None and self.config.domain and stored.world.domain != self.config.domain:
            log.warning(
                "%s holds world %s, not %s: not used",
                self.data_dir,
                stored.world.domain,
                self.config.domain,
            )
            stored = None
        self.snapshot = stored
        try:
            await self.refresh()
        except SourceError as e:
            if stored is None:
                raise
            age = time.time() - stored.resolved_at
            log.warning("%s; serving the last good world, %.0f s old", e, age)
        assert self.snapshot is not None
        return self.snapshot

    async def refresh(self) -> bool:
        """Resolve now; True when the world changed. Raises SourceError (and records it)."""
        if self.config.zone is not None:
            self._stamp = zone_stamp(self.config.zone)
        try:
            world = await fetch_world(self.config)
        except SourceError as e:
            message = f"{self.config.describe()}: {e}" if self.config.zone is None else str(e)
            if message != self.source_error:
                log.error("world refresh failed: %s", message)
            self.source_error = message
            raise SourceError(message) from None
        self.refreshes += 1
        if self.source_error is not None:
            log.info("world source answers again: %s", self.config.describe())
        self.source_error = None
        old = self.snapshot
        if old is not None and old.world.same_shape(world) and old.world.errors == world.errors:
            old.resolved_at = time.time()
            old.world.ttl = world.ttl
            return False
        new = snapshots.advance(old, world, time.time())
        self.snapshot = new
        self._log_changes(old, new)
        if self.data_dir is not None:
            try:
                await trio.to_thread.run_sync(snapshots.save, self.data_dir, new)
            except OSError as e:
                log.error("cannot save the world under %s: %s", self.data_dir, e)
        if self.on_change is not None:
            self.on_change(old, new)
        return True

    def _log_changes(self, old: snapshots.Snapshot | None, new: snapshots.Snapshot) -> None:
        w = new.world
        if old is None:
            log.info("world %s: %d regions, %d nodes", w.domain, len(w.regions), len(w.nodes))
        else:
            added = sorted(set(w.nodes) - set(old.world.nodes))
            removed = sorted(set(old.world.nodes) - set(w.nodes))
            log.info(
                "world %s changed: %d regions, %d nodes (added %s, removed %s)",
                w.domain,
                len(w.regions),
                len(w.nodes),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
            )
        old_errors = set(old.world.errors) if old else set()
        for e in w.errors:
            if e not in old_errors:
                log.warning("world error: %s", e)

    def next_delay(self, failed_for: int) -> float:
        c = self.config
        if failed_for:
            return min(c.max_refresh, max(c.min_refresh, 2.0 ** min(failed_for, 10)))
        ttl = self.snapshot.world.ttl if self.snapshot else None
        return min(c.max_refresh, max(c.min_refresh, float(ttl if ttl is not None else 60)))

    async def run(self) -> None:
        """Refresh forever (cancel to stop)."""
        failures = 0
        while True:
            if self.config.zone is not None:
                # A zone file is read again only when it changed, failed or not.
                await trio.sleep(self.config.poll)
                if zone_stamp(self.config.zone) == self._stamp:
                    continue
            else:
                await trio.sleep(self.next_delay(failures))
            try:
                await self.refresh()
                failures = 0
            except SourceError:
                failures += 1
            except Exception:  # a bug here must not stop the refreshes
                log.exception("world refresh crashed")
                failures += 1
