"""Keeps the cyclic garbage collector's pauses short.

A sidecar's heap is mostly long-lived: the replica (about 30 objects per node) and the
open streams (about 50 each). CPython's full (generation 2) collection walks every tracked
object while it holds the GIL: with 10,000 nodes and 5,000 streams that is 600,000
objects and pauses of 400-870 ms, measured with ``gc.callbacks`` under ``bench fleet``,
during which nothing runs, not even the failure detector's thread.

So objects that survived a while are moved out of the collector's sight with
``gc.freeze()`` (as Instagram does after forking its workers): after the preload, and
every ``freeze_every_s`` for what arrived since. Reference counting still frees them; only
cyclic garbage among frozen objects waits, until every ``full_every_s`` the heap is
unfrozen, collected in full (one longer pause, rare and harmless to the detector, which
looks at the socket before it blames Redis) and frozen again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque

log = logging.getLogger(__name__)


class Heap:
    def __init__(self, *, freeze_every_s: float = 5.0, full_every_s: float = 900.0) -> None:
        self._freeze_every = freeze_every_s
        self._full_every = full_every_s
        self.pauses: deque[tuple[float, float]] = deque(maxlen=256)
        """(monotonic end, seconds) of recent full collections."""
        self._started = 0.0

    def freeze(self) -> None:
        """Collect, then everything alive is long-lived: out of the collector's sight
        (at start-up, before there is anything to stall)."""
        gc.collect()
        gc.freeze()

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((time.monotonic(), time.perf_counter() - self._started))

    def longest_pause(self, within_s: float = 60.0) -> float:
        """The longest full collection of the last ``within_s`` seconds."""
        since = time.monotonic() - within_s
        return max((p for at, p in list(self.pauses) if at >= since), default=0.0)

    async def run(self) -> None:
        gc.callbacks.append(self._observe)
        try:
            last_full = time.monotonic()
            while True:
                await asyncio.sleep(self._freeze_every)
                if time.monotonic() - last_full >= self._full_every:
                    gc.unfreeze()
                    gc.collect()
                    last_full = time.monotonic()
                gc.freeze()
        finally:
            gc.callbacks.remove(self._observe)
