"""The local replica: every node and pool, with a columnar index for selection.

The asyncio loop is the only writer and every method here is synchronous, so a reader
never sees a half-applied change and never takes a lock. Changes arrive from two places:
the change feed (every logged change, in version order) and the sidecar's own writes
(applied at once, so a caller reads its own write). A node is replaced only by a newer
node version, so both paths may deliver the same change in any order.

Watchers subscribe to the ordered feed of changes. The replica keeps the most recent
changes so a Watch can resume from a token without a snapshot.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from registry.index import NodeIndex, lang_key, pool_key
from registry.model import Change, EventType, LanguagePair, Node, Pool


@dataclass(eq=False)
class Subscription:
    """One watcher's queue. Overflow ends the subscription instead of growing memory."""

    pool_id: str
    queue: asyncio.Queue[Change | None]
    overflowed: bool = False


class Replica:
    """Full copy of the registry. Only the event loop calls the mutating methods."""

    def __init__(
        self,
        *,
        history: int = 10_000,
        watch_queue_max: int = 4_096,
        l1_s: float = 5.0,
        l1_jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        self.nodes: dict[str, Node] = {}
        self.pools: dict[str, Pool] = {}
        self.index = NodeIndex()
        """Selection columns and membership masks (pool, language pair, service, label)."""
        self.version = 0
        """Highest log version applied in order; every change up to it is reflected."""
        self.synced_at = 0.0
        """Monotonic time at which the replica was last known to hold every change."""
        self.ready = False
        self.events_applied = 0
        self.reloads = 0
        self._history: deque[tuple[Change, frozenset[str]]] = deque(maxlen=history)
        self._history_floor = 0
        """Changes after this version are all in ``_history`` (resumable)."""
        self._subs: set[Subscription] = set()
        self._queue_max = watch_queue_max
        self._told: dict[str, tuple[int, frozenset[str]]] = {}
        """What watchers were told of each node: (version, pools), from the ordered feed
        alone. Local writes do not touch it, so a pool watcher learns that a node left its
        pool, and a relist tells watchers what they missed, whichever path came first."""
        self._tombstones: dict[str, int] = {}
        """Nodes this sidecar deleted ahead of the feed: id -> version of the delete."""
        self.misses: dict[str, float] = {}
        """Miss markers: id -> monotonic expiry; a change to the node removes its marker."""
        self.l1_s = l1_s
        self._l1_jitter = l1_jitter
        self._rng = rng or random.Random()
        self.repairs = 0

    # --- reads ------------------------------------------------------------------------

    def get(self, node_id: str) -> Node | None:
        return self.nodes.get(node_id)

    def __len__(self) -> int:
        return len(self.nodes)

    def staleness_ms(self) -> int:
        if not self.synced_at:
            return -1
        return int((time.monotonic() - self.synced_at) * 1000)

    def candidates(self, pool_id: str, lang_pair: LanguagePair | None) -> Iterable[Node]:
        """Nodes declaring the pool and serving the language pair (either may be empty)."""
        if not pool_id and lang_pair is None:
            return self.nodes.values()
        idx = self.index
        mask = idx.used()
        if pool_id:
            mask = mask & idx.mask(pool_key(pool_id))
        if lang_pair is not None:
            mask = mask & idx.mask(lang_key(lang_pair))
        ids, nodes = idx.ids, self.nodes
        return [nodes[ids[slot]] for slot in mask.nonzero()[0]]

    def knows_pool(self, pool_id: str) -> bool:
        """Configured by PutPool, or declared by at least one node."""
        return pool_id in self.pools or self.index.has(pool_key(pool_id))

    # --- writes (event loop only) -----------------------------------------------------

    def mark_synced(self) -> None:
        self.synced_at = time.monotonic()

    def confirm(self, node_id: str, now: float | None = None) -> None:
        """Redis vouched for this entry: restart its L1 TTL, with fresh random jitter so
        entries loaded together do not all come due together (no avalanche)."""
        now = time.monotonic() if now is None else now
        span = self.l1_s * self._rng.uniform(1 - self._l1_jitter, 1 + self._l1_jitter)
        self.index.confirm(node_id, now, now + span)

    def confirmed_at(self, node_id: str) -> float | None:
        slot = self.index.slot(node_id)
        return None if slot is None else float(self.index.confirmed[slot])

    def apply_local(self, node: Node | None, node_id: str, version: int) -> None:
        """A write this sidecar made: reflect it now; the feed delivers it again later.

        Skipped when the feed has passed ``version``: it applies changes in order, so it
        already holds this change or a later one (applying it now could resurrect a node
        the feed deleted since).
        """
        if version <= self.version:
            return
        if node is None:
            self._tombstones[node_id] = max(self._tombstones.get(node_id, 0), version)
            current = self.nodes.get(node_id)
            if current is not None and current.version < version:
                self._remove(node_id)
            return
        if self._tombstones.get(node_id, 0) >= node.version:
            return
        current = self.nodes.get(node_id)
        if current is None or current.version < node.version:
            self._store(node)

    def apply_local_pool(self, pool: Pool) -> None:
        """A PutPool this sidecar made (same ordering rule as ``apply_local``)."""
        current = self.pools.get(pool.pool_id)
        if pool.version > self.version and (current is None or current.version < pool.version):
            self.pools[pool.pool_id] = pool

    def apply(self, change: Change) -> None:
        """Apply the next logged change (versions strictly increasing)."""
        if change.version <= self.version:
            return
        if change.type is EventType.POOL:
            current = self.pools.get(change.node_id)
            if change.pool is not None and (current is None or current.version < change.version):
                self.pools[change.node_id] = change.pool
            self.version = change.version
            self.events_applied += 1
            return
        before = self.nodes.get(change.node_id)
        told = self._told.pop(change.node_id, None)
        pools_before = told[1] if told is not None else frozenset()
        if change.node is not None:
            self._told[change.node_id] = (change.version, change.node.pools)
        if change.type is EventType.PUT and change.node is not None:
            dead = self._tombstones.get(change.node_id, 0)
            if (before is None or before.version < change.version) and change.version > dead:
                self._store(change.node)
        elif before is not None and before.version < change.version:
            self._remove(change.node_id)
        if self._tombstones:
            self._tombstones = {k: v for k, v in self._tombstones.items() if v > change.version}
        self.version = change.version
        self.events_applied += 1
        self._history.append((change, pools_before))
        if len(self._history) == self._history.maxlen:
            self._history_floor = self._history[0][0].version - 1
        if told is None or told[0] < change.version:
            # (A relist may already have told watchers this state; then stay quiet.)
            self._publish(change, pools_before)

    def replace_all(self, nodes: Iterable[Node], version: int, pools: Iterable[Pool] = ()) -> None:
        """Swap in a full snapshot (preload, or a reload)."""
        fresh = {n.node_id: n for n in nodes}
        gone = set(self.nodes) | set(self._told)
        gone.difference_update(fresh)
        self.nodes = {}
        self.index.clear()
        self._resync(fresh, gone, version, pools)
        self.reloads += 1

    def patch(
        self, nodes: Iterable[Node], removed: Iterable[str], version: int, pools: Iterable[Pool]
    ) -> None:
        """Bring the replica to ``version`` by replacing only the nodes that changed
        (``nodes``) and dropping ``removed``: a repair when the log lost entries."""
        self._resync({n.node_id: n for n in nodes}, set(removed), version, pools)
        self.repairs += 1

    def _resync(
        self, fresh: dict[str, Node], gone: set[str], version: int, pools: Iterable[Pool]
    ) -> None:
        """Watchers get the difference from what they were told, as PUT/DELETE changes at
        ``version``; the history restarts there, so an older token leads to a snapshot."""
        told = self._told
        changes: list[tuple[Change, frozenset[str]]] = []
        for node_id in sorted(gone):
            seen = told.pop(node_id, None)
            if seen is not None:
                changes.append((Change(version, EventType.DELETE, node_id, None), seen[1]))
            self._remove(node_id)
        now = time.monotonic()
        for node_id, node in fresh.items():
            seen = told.get(node_id)
            if seen is None or seen[0] != node.version:
                before = seen[1] if seen is not None else frozenset()
                changes.append((Change(version, EventType.PUT, node_id, node), before))
            told[node_id] = (node.version, node.pools)
            self._store(node, now)
        self.pools = {p.pool_id: p for p in pools}
        self._tombstones.clear()
        self.version = version
        self._history.clear()
        self._history_floor = version
        for change, pools_before in changes:
            self._publish(change, pools_before)

    def _store(self, node: Node, now: float | None = None) -> None:
        """Every stored node came from Redis just now, so it counts as confirmed."""
        self.nodes[node.node_id] = node
        self.index.put(node)
        self.confirm(node.node_id, now)
        self.misses.pop(node.node_id, None)

    def _remove(self, node_id: str) -> None:
        if self.nodes.pop(node_id, None) is not None:
            self.index.remove(node_id)

    # --- watch ------------------------------------------------------------------------

    def subscribe(self, pool_id: str = "") -> Subscription:
        sub = Subscription(pool_id, asyncio.Queue(maxsize=self._queue_max))
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def end(self, sub: Subscription) -> None:
        """Stop feeding a subscription and wake its reader with the end marker."""
        self._subs.discard(sub)
        _wake(sub)

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def history_after(self, version: int, pool_id: str = "") -> list[Change] | None:
        """Changes after ``version`` as a pool watcher sees them, or None when the history
        no longer covers ``version``."""
        if version < self._history_floor or version > self.version:
            return None
        out = []
        for change, pools_before in self._history:
            if change.version > version:
                seen = for_pool(change, pools_before, pool_id)
                if seen is not None:
                    out.append(seen)
        return out

    def snapshot(self, pool_id: str = "") -> Iterator[Node]:
        if not pool_id:
            return iter(list(self.nodes.values()))
        return iter(sorted(self.candidates(pool_id, None), key=lambda n: n.node_id))

    def _publish(self, change: Change, pools_before: frozenset[str]) -> None:
        for sub in list(self._subs):
            seen = for_pool(change, pools_before, sub.pool_id)
            if seen is None:
                continue
            try:
                sub.queue.put_nowait(seen)
            except asyncio.QueueFull:
                sub.overflowed = True
                self._subs.discard(sub)
                _wake(sub)


def for_pool(change: Change, pools_before: frozenset[str], pool_id: str) -> Change | None:
    """A change as a watcher of ``pool_id`` sees it: changes to nodes of the pool as they
    are, a node leaving the pool as a DELETE, and nothing about other nodes."""
    if not pool_id:
        return change
    now_in = change.node is not None and pool_id in change.node.pools
    if now_in:
        return change
    if pool_id in pools_before:
        return Change(change.version, EventType.DELETE, change.node_id, None)
    return None


def _wake(sub: Subscription) -> None:
    """Make room for the end-of-stream marker so the handler notices the overflow."""
    while True:
        try:
            sub.queue.get_nowait()
        except asyncio.QueueEmpty:
            break
    sub.queue.put_nowait(None)
