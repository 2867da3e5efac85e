"""The change feed: preload the replica, then tail the change log in version order.

Like a Kubernetes informer: list, then watch from the list's version; if the log was
trimmed past the replica's position (a gap), list again. After a connection failure the
feed resumes from its last applied version with backoff and jitter (tenacity).
"""

from __future__ import annotations

import asyncio
import logging
import time

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from registry.cache import Replica
from registry.errors import Unavailable
from registry.gateway import Gateway

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
        self.redis_version = 0
        """Highest version Redis reported (from a snapshot or the log)."""

    async def __aenter__(self) -> ChangeFeed:
        await self.preload()
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def preload(self) -> None:
        """Load every node before the sidecar reports SERVING."""
        started = time.perf_counter()
        await self._reload()
        self._replica.ready = True
        log.info(
            "preloaded %d nodes at version %d in %.0f ms",
            len(self._replica),
            self._replica.version,
            (time.perf_counter() - started) * 1000,
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="changefeed")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._reader.aclose()

    async def _reload(self) -> None:
        snap = await self._gateway.snapshot()
        self._replica.replace_all(snap.nodes, snap.version, snap.pools)
        self.redis_version = max(self.redis_version, snap.version)
        self._replica.mark_synced()
        self.connected = True

    async def _run(self) -> None:
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
            changes = read.changes
            if changes and changes[0].version != replica.version + 1:
                log.warning(
                    "change log gap: have %d, log starts at %d; reloading",
                    replica.version,
                    read.first_version or changes[0].version,
                )
                await self._reload()
                continue
            for change in changes:
                if change.version != replica.version + 1:
                    # Within one read the ids are contiguous unless the log was trimmed
                    # between two reads; reload rather than skip.
                    await self._reload()
                    break
                replica.apply(change)
            if changes:
                self.redis_version = max(self.redis_version, changes[-1].version)
            if len(changes) < LOG_BATCH:
                # Redis answered with everything it had: in sync as of its answer.
                replica.synced_at = answered
