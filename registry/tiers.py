"""L1/L2 tiers: how long a replica entry is trusted without Redis vouching for it again.

Every entry records when Redis last confirmed it (a change from the log, a reload, or a
check) and when its L1 TTL runs out (``l1_s`` with random jitter, so entries loaded
together do not come due together: no avalanche).

- **L1 (5 s)**: within it an entry is served as is. Past it, a read still answers at once;
  the revalidator, one task (single-flight), checks every entry that came due in one
  pipelined round trip of ``HGET ver`` per tick, and confirms those Redis agrees with.
  One that disagrees means the replica missed something: the change feed catches up, and
  an entry that still disagrees after that is repaired. This is anti-entropy: with a
  healthy feed it finds nothing, and it finds whatever the feed missed.
- **L2 (30 s)**: an entry not confirmed for this long is not served in normal mode
  without asking Redis first (a read-through, bounded by the Redis timeout). In degraded
  mode L2 decides what may still be served fresh (the degradation manager builds on it).
- **Miss markers**: a lookup of an unknown id that has to ask Redis (the replica is not
  known to be complete: not in sync within ``complete_ms``) leaves a marker with a random
  TTL in [1, 10] s; lookups of that id skip Redis until it expires or the node appears.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.errors import Unavailable
from registry.gateway import Gateway
from registry.model import Node

log = logging.getLogger(__name__)

MAX_MISS_MARKERS = 100_000
"""Markers kept at most; past it the oldest are dropped (a flood of random ids)."""


class Tiers:
    def __init__(
        self,
        gateway: Gateway,
        replica: Replica,
        feed: ChangeFeed,
        *,
        l2_s: float = 30.0,
        tick_s: float = 0.1,
        batch: int = 2_000,
        miss_ttl_s: tuple[float, float] = (1.0, 10.0),
        complete_ms: int = 1_000,
        rng: random.Random | None = None,
        paused: Callable[[], bool] = lambda: False,
    ) -> None:
        self._paused = paused
        """True while degraded: no background Redis traffic then (recovery owns it)."""
        self._gateway = gateway
        self._replica = replica
        self._feed = feed
        self.l2_s = l2_s
        self._tick = tick_s
        self._batch = batch
        self._miss_ttl = miss_ttl_s
        self._complete_ms = complete_ms
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self.revalidated = 0
        self.revalidation_rounds = 0
        self.recent_rounds: deque[tuple[float, int]] = deque(maxlen=1_000)
        """(monotonic time, entries checked) of recent rounds: how revalidation spreads."""
        self.drift = 0
        self.lookups = {"l1": 0, "l2": 0, "redis": 0, "miss_marker": 0, "miss": 0}
        """Lookups by how they were answered (metrics read these)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="revalidator")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- reads ----------------------------------------------------------------------

    def complete(self) -> bool:
        """Whether a miss in the replica is authoritative: it was in sync very recently."""
        staleness = self._replica.staleness_ms()
        return self._replica.ready and 0 <= staleness < self._complete_ms

    async def lookup(self, node_id: str) -> Node | None:
        """One node by id, asking Redis only when the replica cannot vouch for it."""
        replica = self._replica
        now = time.monotonic()
        node = replica.get(node_id)
        if node is not None:
            confirmed = replica.confirmed_at(node_id) or 0.0
            age = now - confirmed
            if age <= replica.l1_s:
                self.lookups["l1"] += 1
                return node
            if age <= self.l2_s:
                self.lookups["l2"] += 1  # the revalidator has it in hand
                return node
            if self._paused():
                return node  # degraded: served as cached; Freshness says so
            return await self._read_through(node_id, node)
        if self.complete() or self._paused():
            self.lookups["miss"] += 1
            return None
        marker = replica.misses.get(node_id)
        if marker is not None and marker > now:
            self.lookups["miss_marker"] += 1
            return None
        return await self._read_through(node_id, None)

    async def _read_through(self, node_id: str, cached: Node | None) -> Node | None:
        self.lookups["redis"] += 1
        try:
            fresh = await self._gateway.read_node(node_id)
        except Unavailable:
            return cached  # served as the replica has it; Freshness says degraded
        replica = self._replica
        if fresh is None:
            if cached is None:
                self._mark_miss(node_id)
            return None if cached is None else cached
        if cached is not None and cached.version == fresh.version:
            replica.confirm(node_id)
        else:
            replica.apply_local(fresh, node_id, fresh.version)
        return fresh

    def _mark_miss(self, node_id: str) -> None:
        misses = self._replica.misses
        if len(misses) >= MAX_MISS_MARKERS:
            for stale in list(misses)[: MAX_MISS_MARKERS // 10]:
                del misses[stale]
        low, high = self._miss_ttl
        misses[node_id] = time.monotonic() + self._rng.uniform(low, high)

    # --- background revalidation -----------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            if self._paused():
                continue
            try:
                await self.revalidate_due()
            except Unavailable as exc:
                log.debug("revalidation skipped: %s", exc)
            self._expire_markers()

    def due(self, now: float | None = None) -> list[str]:
        """Ids whose L1 ran out, most overdue first, at most one batch."""
        now = time.monotonic() if now is None else now
        idx = self._replica.index
        n = idx.size
        slots = np.flatnonzero(idx.used() & (idx.l1_due[:n] <= now))
        if len(slots) > self._batch:
            slots = slots[np.argsort(idx.l1_due[slots])[: self._batch]]
        return [idx.ids[s] for s in slots]

    async def revalidate_due(self) -> int:
        """One round: check every due entry against Redis in one pipelined call."""
        ids = self.due()
        if not ids:
            return 0
        self.revalidation_rounds += 1
        self.recent_rounds.append((time.monotonic(), len(ids)))
        version, versions = await self._gateway.node_versions(ids)
        drifted = self._confirm(ids, versions)
        if drifted:
            self.drift += len(drifted)
            log.warning(
                "%d replica entries disagree with Redis (e.g. %s); catching up",
                len(drifted),
                drifted[0],
            )
            await self._feed.catch_up()
            _, again = await self._gateway.node_versions(drifted)
            if self._confirm(drifted, again, only_past=version):
                await self._feed.repair()
        self.revalidated += len(ids)
        return len(ids)

    def _confirm(self, ids: list[str], versions: dict[str, int], only_past: int = 0) -> list[str]:
        """Confirm the entries Redis agrees with; return the ids that disagree. A node
        Redis holds at a version the replica has not reached yet is only in flight."""
        replica = self._replica
        now = time.monotonic()
        drifted = []
        for node_id in ids:
            node = replica.get(node_id)
            if node is None:
                continue
            have = versions.get(node_id)
            if have == node.version:
                replica.confirm(node_id, now)
            elif have is None or have <= max(replica.version, only_past):
                drifted.append(node_id)
        return drifted

    def _expire_markers(self) -> None:
        misses = self._replica.misses
        if misses:
            now = time.monotonic()
            for node_id in [k for k, t in misses.items() if t <= now]:
                del misses[node_id]
