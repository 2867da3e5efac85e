"""The change feed: preload the replica, then tail the change log in version order.

Like a Kubernetes informer: list, then watch from the list's version; if the log was
trimmed past the replica's position (a gap), list again. After a connection failure the
feed resumes from its last applied version with backoff and jitter (tenacity).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from registry import dataset
from registry.cache import Replica
from registry.errors import Unavailable
from registry.gateway import Gateway
from registry.model import Change

log = logging.getLogger(__name__)

LOG_BATCH = 1000
"""Most log entries read per round trip."""


class ChangeFeed:
    """Keeps a Replica in step with Redis. ``async with`` starts it; ``aclose`` stops it."""

    def __init__(self, gateway: Gateway, replica: Replica, *, block_ms: int = 250) -> None:
        self._gateway = gateway
        self._replica = replica
        self._reader = gateway.log_reader(block_ms)
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self._resync = asyncio.Lock()
        """Held while a snapshot is read and swapped in (reload, repair, catch-up), and
        while the tail applies a batch: otherwise the tail could move the replica past a
        snapshot's version, and swapping the snapshot in would move it back (watchers
        must never see versions go backwards). Readers never take it."""
        self.redis_version = 0
        """Highest version Redis reported (from a snapshot or the log)."""
        self.on_lost: Callable[[str], object] | None = None
        """Told when a snapshot shows Redis behind the replica: Redis lost data (the
        degradation rebuilds; the snapshot is not swapped in)."""

    async def __aenter__(self) -> ChangeFeed:
        await self.preload()
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def preload(self) -> None:
        """Load every node before the sidecar reports SERVING."""
        started = time.perf_counter()
        await self.reload()
        self._replica.ready = True
        log.info(
            "preloaded %d nodes at version %d in %.0f ms",
            len(self._replica),
            self._replica.version,
            (time.perf_counter() - started) * 1000,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="changefeed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._reader.aclose()

    async def reload(self) -> None:
        async with self._resync:
            await self._reload()

    async def _reload(self) -> None:
        had = self._replica.version
        snap = await self._gateway.snapshot()
        self._refuse_regression(snap.version, had)
        self._replica.replace_all(snap.nodes, snap.version, snap.pools)
        self.redis_version = max(self.redis_version, snap.version)
        self._replica.mark_synced()
        self.connected = True

    def apply(self, changes: list[Change]) -> bool:
        """Apply log entries past the replica's version, in order. False on a gap (the
        log lost entries the replica needs); entries already applied are skipped, so the
        feed and a catch-up may deliver the same entries."""
        replica = self._replica
        for change in changes:
            if change.version <= replica.version:
                continue
            if change.version != replica.version + 1:
                return False
            replica.apply(change)
        if changes:
            self.redis_version = max(self.redis_version, changes[-1].version)
        return True

    async def catch_up(self) -> str:
        """Bring the replica up to Redis now, without waiting for the tail: from the log
        if it still holds what is missing, else by repair. Returns which it took."""
        reader = self._gateway.log
        async with self._resync:
            while True:
                read = await reader.read(
                    self._replica.version, LOG_BATCH, previous=self._replica.nodes
                )
                if not self.apply(read.changes):
                    await self._repair()
                    return "repair"
                if len(read.changes) < LOG_BATCH:
                    return "log"

    async def repair(self) -> None:
        async with self._resync:
            await self._repair()

    async def _repair(self) -> None:
        """The log lost entries: compare every node's version with Redis and fetch only
        the nodes that differ (a relist, minus the nodes that did not change)."""
        replica = self._replica
        had = replica.version
        version, versions = await self._gateway.node_versions()
        self._refuse_regression(version, had)
        changed = [
            i for i, v in versions.items() if (n := replica.get(i)) is None or n.version != v
        ]
        removed = [i for i in replica.nodes if i not in versions]
        nodes = await self._gateway.read_nodes(changed)
        pools = await self._gateway.read_pools()
        replica.patch(nodes, removed, version, pools)
        self.redis_version = max(self.redis_version, version)
        log.warning(
            "repaired the replica at version %d: %d nodes fetched, %d removed",
            version,
            len(nodes),
            len(removed),
        )

    def _refuse_regression(self, version: int, had: int) -> None:
        """A snapshot older than the replica means Redis lost data (restarted empty, a
        failover that lost writes). Swapping it in would move the replica, and every
        watcher, back; the sidecar rebuilds instead, which lifts Redis's version first."""
        why = dataset.loss(
            version=version, had=had, epoch=self._gateway.epoch, known_epoch=self._gateway.epoch
        )
        if why is not None:
            if self.on_lost is not None:
                self.on_lost(why)
            raise Unavailable(why)

    async def run(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Unavailable),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            before_sleep=self._on_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._tail()

    def _on_failure(self, state: object) -> None:
        if self.connected:
            log.warning("change feed lost Redis; resuming from version %d", self._replica.version)
        self.connected = False

    async def _tail(self) -> None:
        replica = self._replica
        while True:
            read = await self._reader.read(replica.version, LOG_BATCH, previous=replica.nodes)
            answered = time.monotonic()
            if not self.connected:
                self.connected = True
                log.info("change feed connected at version %d", replica.version)
            async with self._resync:
                applied = self.apply(read.changes)
            if not applied:
                log.warning(
                    "change log gap: have %d, log starts at %d; repairing",
                    replica.version,
                    read.first_version or read.changes[0].version,
                )
                await self.repair()
                continue
            if len(read.changes) < LOG_BATCH:
                # Redis answered with everything it had: in sync as of its answer.
                replica.synced_at = answered
