"""Degradation: the modes, the breaker, and where each write goes.

**Down, not busy.** Only the failure detector (``detector.py``: a refused, reset or closed
connection, or silence on every connection past an adaptive threshold) and a hot-path
connection error put the sidecar in a degraded mode. A slow answer does not: a write
waits for Redis within its own deadline (``--hot-timeout-ms``). Redis losing the data
set (``registry.dataset.loss``, asked by the version checker and the change feed) trips
it too, and recovery rebuilds.

**Modes.** NORMAL -> L2_ONLY while the replica was in sync within the L2 TTL (entries are
served, flagged degraded) -> LOCAL_ONLY past it (whatever is cached is served, flagged
degraded and stale) -> NORMAL once Redis answers again (``recovery.py``). Reads never
fail because Redis is down. Each transition is logged once and counted.

**Writes.** ``write(command)`` runs a typed command (``commands.py``) against Redis. It is
buffered (acknowledged, replayed later) when the sidecar is degraded, when it goes down
while the write waits, or when the write's own deadline passes; never while Redis is
answering in time. A live write waits first for buffered writes to the same node, job or
pool, so they reach Redis in the order they were acknowledged. Reservations cannot be
promised without Redis: refused UNAVAILABLE with retry advice (policy ``reject``) or
granted from the local view (policy ``local``, ``local_slots.py``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.degradation.buffer import WriteBuffer
from registry.degradation.commands import Command
from registry.degradation.detector import Detector, Probe, Thresholds
from registry.degradation.journal import Journal
from registry.degradation.local_slots import LocalSlots
from registry.degradation.recovery import Recovery
from registry.errors import Unavailable
from registry.gateway import Gateway
from registry.scheduler import Slots

log = logging.getLogger(__name__)

R = TypeVar("R")


class Spawn(Protocol):
    """Runs a part of the sidecar (the supervisor's ``spawn``): restarted when it fails,
    and, with ``forever``, when it returns."""

    def __call__(
        self, name: str, factory: Callable[[], Awaitable[None]], *, forever: bool = True
    ) -> object: ...


LOOP_TICK_S = 0.005
ORDER_WAIT_S = 1.0
"""How long a live write waits for buffered writes to the same key before it is buffered
behind them instead (acknowledged BUFFERED, order kept)."""


class Mode(enum.Enum):
    NORMAL = "NORMAL"
    L2_ONLY = "L2_ONLY"
    LOCAL_ONLY = "LOCAL_ONLY"


class Degradation:
    def __init__(
        self,
        gateway: Gateway,
        replica: Replica,
        feed: ChangeFeed,
        *,
        l2_s: float,
        live_nodes: Callable[[], Iterable[str]],
        max_ops: int = 10_000,
        max_heartbeats: int = 100_000,
        stampede_jitter_s: float = 0.05,
        probe_max_s: float = 1.0,
        local_slot_budget: int = 0,
        rng: random.Random | None = None,
        probe: Callable[[], Probe] | None = None,
        probe_interval_s: float = 0.01,
        thresholds: Thresholds | None = None,
        journal: Journal | None = None,
    ) -> None:
        self._gateway = gateway
        self._replica = replica
        self._l2 = l2_s
        self._probe_max = probe_max_s
        self.buffer = WriteBuffer(max_ops, max_heartbeats, journal)
        self.local = LocalSlots(replica, self.buffer, local_slot_budget)
        """Slots granted while degraded (policy ``local``); budget 0 under ``reject``."""
        self.recovery = Recovery(
            gateway,
            replica,
            feed,
            self.buffer,
            self.local,
            live_nodes=live_nodes,
            stampede_jitter_s=stampede_jitter_s,
            rng=rng or random.Random(),
        )
        self._mode = Mode.NORMAL
        self._since = 0.0
        self._down: asyncio.Future[None] | None = None
        """Resolved when Redis goes down; writes waiting on Redis give up on it then."""
        self._drain = asyncio.Event()
        self._catch_up: bool | None = None
        """After a recovery: the replica catches up from the log (False) or reloads (True)."""
        self._drained = asyncio.Event()
        self._drained.set()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.outages = 0
        self.tripped_at: deque[float] = deque(maxlen=100)
        """Monotonic time of each recent trip (time-to-degraded figures)."""
        self.recovered_at: deque[float] = deque(maxlen=100)
        self.last_outage_ms = 0
        self.last_tick = time.monotonic()
        """When the loop ticker last ran (the detector reads it from its thread)."""
        self.loop_lags: deque[float] = deque(maxlen=int(1 / LOOP_TICK_S))
        """How late the loop ticker woke, over about the last second."""
        self._detected_at: float | None = None
        """Set by the detector thread the moment it sees Redis fail (GIL-atomic)."""
        self.detector: Detector | None = None
        self._probe = probe
        self._probe_interval = probe_interval_s
        self._thresholds = thresholds or Thresholds()
        self._spawn: Spawn | None = None
        self._tasks: list[asyncio.Task[None]] = []
        gateway.observer = self.observe

    def restore_journal(self) -> int:
        """Buffered writes from before a restart come back (replayed once serving)."""
        n = self.buffer.load()
        self.local.restore()
        if n:
            log.warning("journal: %d writes acknowledged before a restart are to be replayed", n)
            self._drain.set()
            self._drained.clear()
        return n

    def start(self, spawn: Spawn | None = None) -> None:
        """Start the detector thread and the loops (under ``spawn``, the supervisor)."""
        loop = asyncio.get_running_loop()
        self._spawn = spawn or self._own_task
        self._spawn("loop-ticker", self._tick_loop)
        self._spawn("buffer-drain", self._drain_loop)
        if self._probe is not None:
            self.detector = Detector(
                self._probe,
                interval_s=self._probe_interval,
                thresholds=self._thresholds,
                on_down=lambda why: self._trip_from_thread(loop, why),
                heard=lambda: self._gateway.last_answer,
                loop_behind=lambda: time.monotonic() - self.last_tick,
            )
            self.detector.start()

    def _own_task(
        self, name: str, factory: Callable[[], Awaitable[None]], *, forever: bool = True
    ) -> None:
        self._tasks.append(asyncio.ensure_future(factory()))

    async def aclose(self) -> None:
        if self.detector is not None:
            await asyncio.to_thread(self.detector.stop)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _tick_loop(self) -> None:
        """How late a 5 ms ticker wakes is the event loop's lag (kept for the metrics)."""
        self.last_tick = time.monotonic()
        while True:
            await asyncio.sleep(LOOP_TICK_S)
            now = time.monotonic()
            self.loop_lags.append(max(now - self.last_tick - LOOP_TICK_S, 0.0))
            self.last_tick = now

    # --- state ------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Redis is down: writes are buffered, reads flagged."""
        return self._mode is not Mode.NORMAL or self._detected_at is not None

    @property
    def suspect(self) -> bool:
        """Degraded, or Redis's answer to the detector is overdue: reads say they may not
        be fresh, while writes still go to Redis."""
        return self.degraded or (self.detector is not None and self.detector.suspect())

    @property
    def mode(self) -> Mode:
        """The current mode; moves L2_ONLY -> LOCAL_ONLY once the replica is older than L2."""
        if self._mode is Mode.L2_ONLY:
            age = time.monotonic() - self._replica.synced_at
            if age > self._l2:
                self._set(Mode.LOCAL_ONLY, f"replica older than the L2 TTL ({self._l2:g} s)")
        return self._mode

    @property
    def observed_mode(self) -> Mode:
        """The mode as ``mode`` would report it, without moving it: safe to read from
        another thread (the metrics endpoint's)."""
        if self._mode is Mode.L2_ONLY and time.monotonic() - self._replica.synced_at > self._l2:
            return Mode.LOCAL_ONLY
        return self._mode

    @property
    def degraded_ms(self) -> int:
        return int((time.monotonic() - self._since) * 1000) if self.degraded else 0

    @property
    def rebuilds(self) -> int:
        return self.recovery.rebuilds

    def _set(self, mode: Mode, why: str) -> None:
        if mode is self._mode:
            return
        self.transitions[(self._mode.value, mode.value)] += 1
        log.warning("mode %s -> %s: %s", self._mode.value, mode.value, why)
        self._mode = mode

    # --- breaker ----------------------------------------------------------------------

    def observe(self, failure: str | None, detail: str = "") -> None:
        """The outcome of one hot-path Redis call: None, "timeout" or "error".

        A connection error (after the client's one retry on a fresh connection) means
        Redis is unreachable. A timeout means only that this call's deadline passed: its
        caller buffers it, and the detector decides whether Redis is down.
        """
        if failure == "error" and not self.degraded:
            self.trip(detail)

    def _trip_from_thread(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
        """From the detector thread: degraded from this instant (a flag every handler
        reads); the mode change and recovery follow on the loop."""
        if self._mode is Mode.NORMAL and self._detected_at is None:
            self._detected_at = time.monotonic()
        loop.call_soon_threadsafe(self.trip, why)

    def trip(self, why: str) -> None:
        detected, self._detected_at = self._detected_at, None
        if self._mode is not Mode.NORMAL:
            return
        self._since = detected if detected is not None else time.monotonic()
        self.tripped_at.append(self._since)
        self.outages += 1
        self._set(Mode.L2_ONLY, why)
        if self._down is not None and not self._down.done():
            self._down.set_result(None)
        self._gateway.abandon_heartbeats(Unavailable(f"Redis down: {why}"))
        spawn = self._spawn or self._own_task
        try:
            spawn("recovery", self._recover, forever=False)
        except RuntimeError:  # shutting down: the supervisor is closed
            log.debug("no recovery: shutting down")

    # --- writes -----------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """NORMAL with nothing left to replay: every acknowledged write is in Redis."""
        return not self.degraded and not self.draining

    async def write(self, command: Command[R]) -> R | None:
        """Run a write: its result, or None when it was buffered (acknowledged, replayed
        later). A repeat of a write that did reach Redis is harmless on replay: the
        scripts are idempotent."""
        if not self.degraded and self.buffer.pending(command.keys):
            await self.ordered(command.keys, raise_on_timeout=False)
        if self.degraded or self.buffer.pending(command.keys):
            self.buffer.add(command)  # BufferFull: refused, nothing acknowledged
            self._drain.set()
            return None
        call = asyncio.ensure_future(command.run(self._gateway))
        down = self._down_future()
        await asyncio.wait((call, down), return_when=asyncio.FIRST_COMPLETED)
        if call.done():
            try:
                return call.result()
            except Unavailable as exc:  # its deadline passed, or Redis went down
                log.info("%s buffered: %s", command.kind, exc)
        else:  # Redis went down while it waited: it may or may not have reached it
            call.cancel()
        self.buffer.add(command)
        self._drain.set()
        return None

    def _down_future(self) -> asyncio.Future[None]:
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    async def ordered(self, keys: tuple[str, ...], *, raise_on_timeout: bool = True) -> None:
        """Wait until no buffered write touches ``keys`` (replayed in order first)."""
        deadline = time.monotonic() + ORDER_WAIT_S
        while self.buffer.pending(keys) and not self.degraded:
            self._drain.set()
            left = deadline - time.monotonic()
            if left <= 0:
                if raise_on_timeout:
                    raise Unavailable(
                        "earlier writes to the same node or job are still being "
                        "replayed to Redis; retry shortly"
                    )
                return
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), left)
            except TimeoutError:
                pass

    def slots(self, what: str) -> Slots:
        """Where a reservation goes: Redis, or while degraded the local grants (policy
        ``local``) or nowhere: UNAVAILABLE with retry advice (policy ``reject``)."""
        if self.degraded and self.local.budget > 0:
            return self.local
        self.refuse(what)  # raises while degraded (policy reject)
        return self._gateway

    def refuse(self, what: str) -> None:
        """Writes that cannot be promised without Redis (slots)."""
        if self.degraded:
            raise Unavailable(
                f"{what} needs Redis, which is unreachable (mode "
                f"{self.mode.value}); retry in about {self._probe_max:g} s"
            )

    @property
    def draining(self) -> bool:
        """Buffered writes wait to be replayed (expiry holds off until they are)."""
        return len(self.buffer) > 0

    # --- recovery ---------------------------------------------------------------------

    async def _recover(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Unavailable),
            wait=wait_exponential_jitter(multiplier=0.02, max=self._probe_max, jitter=0.05),
            before_sleep=self._between_probes,
        )
        lost = False
        async for attempt in retrying:
            with attempt:
                lost = await self.recovery.restore()
        self.last_outage_ms = self.degraded_ms
        self.recovered_at.append(time.monotonic())
        self._catch_up = lost
        self._drain.set()
        # Last, with no await after it: a trip from here on starts a new recovery.
        self._set(
            Mode.NORMAL,
            f"Redis back after {self.last_outage_ms} ms; {len(self.buffer)} buffered "
            "writes to replay",
        )

    def _between_probes(self, _: object) -> None:
        """Let the mode move from L2_ONLY to LOCAL_ONLY on time."""
        _ = self.mode

    async def _drain_loop(self) -> None:
        """Replays the buffer whenever it holds something and Redis is up."""
        if self.draining:  # (re)started with work waiting
            self._drain.set()
        while True:
            await self._drain.wait()
            self._drain.clear()
            if self._catch_up is not None and not self.degraded:
                lost, self._catch_up = self._catch_up, None
                await self.recovery.catch_up(lost)
            while self.draining and not self.degraded:
                try:
                    n = await self.recovery.drain_round()
                except Unavailable as exc:
                    log.info("replay paused: %s", exc)
                    await asyncio.sleep(0.05)
                    continue
                if n:
                    log.info("replayed %d buffered writes and heartbeats", n)
            if not self.draining:
                self._drained.set()
