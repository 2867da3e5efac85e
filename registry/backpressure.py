"""Backpressure on heartbeat ingest: a saturated sidecar says so instead of collapsing.

The rule, re-evaluated every ``PERIOD_S``:

    pressure = max(queued heartbeats / queue_soft, event-loop lag / lag_soft)
    target   = min(max(pressure, 1), max_factor)

``factor`` (what acks tell nodes: ``interval_ms`` = a third of the node's TTL x factor) goes
up to the target at once, and comes down by a fifth per period once the target has been
lower for ``hold_s``, so a burst does not make it flap. The deadline Redis sets on each
heartbeat stretches by ``stretch``, the highest factor told in the last ``hold_s``, so a
node that beats less often because it was asked to never expires for it (heartbeat.lua).

Every queue is bounded: at ``queue_max`` heartbeats waiting for a batch, a stream's
reader waits for room before it takes the next message, so gRPC's flow control holds the
node back; the per-stream window (64 in flight) and the write buffer have bounds of their
own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

PERIOD_S = 0.1


@dataclass(frozen=True, slots=True)
class Limits:
    queue_soft: int = 1024
    """Heartbeats waiting for a batch at which the interval starts to stretch."""
    queue_max: int = 8192
    """Heartbeats waiting for a batch at which streams stop being read."""
    lag_soft_s: float = 0.02
    """Median event-loop lag over the last second at which the interval starts to stretch."""
    max_factor: float = 4.0
    """The most the interval is ever stretched."""
    hold_s: float = 10.0
    """How long a raised factor holds before it comes down."""


class Backpressure:
    def __init__(
        self,
        limits: Limits,
        *,
        queued: Callable[[], int],
        loop_lag: Callable[[], float],
        stretch: Callable[[float], None],
    ) -> None:
        self._limits = limits
        self._queued = queued
        self._loop_lag = loop_lag
        self._stretch = stretch
        self.factor = 1.0
        self.pressure = 0.0
        self._raised_at = 0.0
        self._told: list[tuple[float, float]] = []
        """(time, factor) told within the last hold_s."""
        self._room = asyncio.Event()
        self._room.set()
        self.waits = 0
        """Times a stream's reader waited for room in the ingest queue."""
        self.raised = 0
        """Times the factor went up."""

    def update(self, now: float | None = None) -> None:
        lim = self._limits
        now = time.monotonic() if now is None else now
        queued = self._queued()
        self.pressure = max(queued / lim.queue_soft, self._loop_lag() / lim.lag_soft_s)
        target = min(max(self.pressure, 1.0), lim.max_factor)
        if target > self.factor:
            self.factor = round(target, 2)
            self._raised_at = now
            self.raised += 1
        elif target < self.factor and now - self._raised_at >= lim.hold_s:
            self.factor = round(max(target, self.factor * 0.8), 2)
        self._told = [(t, f) for t, f in self._told if now - t < lim.hold_s]
        self._told.append((now, self.factor))
        self._stretch(max(f for _, f in self._told))
        if queued < lim.queue_max:
            self._room.set()

    @property
    def full(self) -> bool:
        return self._queued() >= self._limits.queue_max

    async def room(self) -> None:
        """Wait until the ingest queue has room (a stream's reader calls this when full)."""
        if not self.full:
            return
        self.waits += 1
        self._room.clear()
        await self._room.wait()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)
            self.update()
