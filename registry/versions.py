"""The version checker: bounded staleness, whatever happens to the change feed.

The feed pushes changes within a round trip, but a blocking read can stall without an
error (a half-open connection, a frozen Redis). So every ``interval`` the checker reads
Redis's version with its own short timeout and compares:

- equal: the replica is in sync as of the moment the check was sent (``synced_at``), so
  ``staleness_ms`` stays truthful while the log is quiet;
- Redis ahead for longer than ``grace`` (time for the feed to deliver): catch up now, from
  the log, or by repair when the log no longer holds what is missing;
- Redis behind the replica: Redis lost data (a restart without persistence, a failover to
  a lagging replica); reload.

A check that times out is counted and skipped; it never blocks a reader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from registry import dataset
from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.errors import Unavailable
from registry.gateway import Gateway

log = logging.getLogger(__name__)


class VersionChecker:
    def __init__(
        self,
        gateway: Gateway,
        replica: Replica,
        feed: ChangeFeed,
        *,
        interval_s: float = 0.1,
        timeout_s: float = 0.05,
        grace_s: float = 0.2,
        paused: Callable[[], bool] = lambda: False,
        lost: Callable[[str], None] = lambda why: None,
    ) -> None:
        self._paused = paused
        self._lost = lost
        """Called when Redis lost the data set: the degradation manager rebuilds it."""
        self._gateway = gateway
        self._replica = replica
        self._feed = feed
        self._interval = interval_s
        self._timeout = timeout_s
        self._grace = grace_s
        self._task: asyncio.Task[None] | None = None
        self.checks = 0
        self.timeouts = 0
        self.catchups = 0
        self.redis_version = 0
        self.lag_versions = 0
        self._behind_since: float | None = None

    @property
    def lag_ms(self) -> int:
        """How long the replica has been behind Redis (0 when in step)."""
        if self._behind_since is None:
            return 0
        return int((time.monotonic() - self._behind_since) * 1000)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="version-checker")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._paused():
                continue
            try:
                await self.check()
            except Unavailable as exc:
                log.debug("version check failed: %s", exc)

    async def check(self) -> None:
        self.checks += 1
        replica = self._replica
        sent = time.monotonic()
        # The replica's version when the check is sent: Redis's answer is read later, so
        # it can only be at or above this one, unless Redis lost data. (The feed goes on
        # applying while the check is in flight; comparing with the replica's version
        # after the answer would see Redis "behind" whenever the feed is quick.)
        had = replica.version
        try:
            version, epoch = await asyncio.wait_for(self._gateway.state(), self._timeout)
        except (TimeoutError, Unavailable):
            self.timeouts += 1
            return
        self.redis_version = version
        why = dataset.loss(version=version, had=had, epoch=epoch, known_epoch=self._gateway.epoch)
        if why is not None:
            self._behind_since = None
            self._lost(why)
            return
        lag = version - replica.version
        self.lag_versions = max(lag, 0)
        if lag <= 0:
            # In step (or the feed applied more while the check was in flight).
            self._behind_since = None
            replica.synced_at = max(replica.synced_at, sent)
            return
        if self._behind_since is None:
            self._behind_since = sent
        if sent - self._behind_since >= self._grace:
            how = await self._feed.catch_up()
            self.catchups += 1
            log.info(
                "replica was %d versions behind for %d ms; caught up by %s",
                lag,
                int((sent - self._behind_since) * 1000),
                how,
            )
            self.lag_versions = max(version - replica.version, 0)
            if replica.version >= version:
                self._behind_since = None
                replica.synced_at = max(replica.synced_at, sent)
