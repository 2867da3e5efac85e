"""Degradation: notice Redis failing within tens of milliseconds, keep serving, lose
nothing acknowledged, and come back by itself.

**Breaker.** Every hot-path Redis call reports its outcome here (``observe``). A
connection error trips the breaker at once. A timeout (the hot path's is ~25 ms) trips it
at once too, if the event loop was responsive (a 5 ms ticker ran within the last 15 ms):
then Redis, not the sidecar, was slow. After a stall of the sidecar's own event loop,
which makes every call in flight time out together, a timeout trips it only if a PING
sent right after also times out. A frozen Redis (SIGSTOP) sends no reset, so only these
timers find it. Redis losing the data set (the version checker sees its epoch change or
its version go backwards) trips it as well, and recovery rebuilds.

**Modes.** NORMAL -> L2_ONLY while the replica was in sync within the L2 TTL (entries are
served, flagged degraded) -> LOCAL_ONLY past it (whatever is cached is served, flagged
degraded and stale) -> NORMAL once recovery finishes. Reads never fail because Redis is
down. Each transition is logged once and counted.

**Writes while degraded.** Heartbeats are acknowledged as BUFFERED and coalesced to the
latest per node. Register, deregister, drain, release and pool writes are queued in order.
Every buffered write is replayed through the same idempotent scripts, so replaying a
write whose first attempt did reach Redis (its reply was lost) changes nothing twice.
Reservations and Schedule are refused (UNAVAILABLE, with retry advice): a slot cannot be
promised without Redis. The buffer is bounded (``max_ops`` writes, ``max_heartbeats``
nodes); a write past the bound is refused UNAVAILABLE, so nothing acknowledged is dropped.

**Recovery.** A probe with exponential backoff and jitter (tenacity) waits for Redis. Then:
if Redis lost the data set (its epoch is gone or changed, or its version went backwards)
the version counter is lifted above everything watchers saw and the nodes whose heartbeat
streams this sidecar holds are registered again, with the pools it knows; the buffer is
replayed (after a random pause, so sidecars recovering together do not stampede); the
replica catches up (or reloads); only then is the mode NORMAL again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    RegistryError,
    ResourceExhausted,
    Unavailable,
)
from registry.gateway import Gateway
from registry.model import (
    HeartbeatIn,
    HeartbeatOutcome,
    Node,
    NodeSpec,
    NodeStatus,
    Reservation,
)
from registry.scheduler import Slots

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_REPLAY_BATCH = 500
LOOP_TICK_S = 0.005
LOOP_LAG_S = 0.015
"""A loop whose 5 ms ticker ran within 15 ms is responsive: a timeout seen then is real."""


class Watchdog:
    """Checks Redis from a thread of its own, with a blocking socket timeout.

    Why a thread: a timeout timed on the event loop measures the loop's queue as well as
    Redis. Under a saturating load (the heartbeat benchmark) calls answered by Redis in
    6 ms showed as 25 ms timeouts and tripped the breaker. A blocking PING in a thread
    waits on the socket with the GIL released, so the loop's congestion does not count.
    """

    def __init__(
        self,
        factory: Callable[[], Callable[[], None]],
        interval_s: float,
        trip: Callable[[str], object],
    ) -> None:
        self._factory = factory
        self._interval = interval_s
        self._trip = trip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-watchdog", daemon=True)
        self.checks = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        ping = self._factory()
        failing = False
        while not self._stop.wait(self._interval):
            self.checks += 1
            try:
                ping()
            except Exception as exc:  # any failure to answer in time is the signal
                if not failing:
                    self._trip(f"watchdog PING failed: {type(exc).__name__}: {exc}")
                failing = True
            else:
                failing = False


class Mode(enum.Enum):
    NORMAL = "NORMAL"
    L2_ONLY = "L2_ONLY"
    LOCAL_ONLY = "LOCAL_ONLY"


class BufferFull(Unavailable):
    """Degraded, and the write buffer is at its bound: the write is refused, not lost."""


class WriteBuffer:
    """Writes acknowledged while Redis was unreachable, to replay in order."""

    def __init__(self, max_ops: int, max_heartbeats: int) -> None:
        self.ops: deque[tuple[str, tuple[Any, ...]]] = deque()
        self.heartbeats: dict[str, HeartbeatIn] = {}
        self._max_ops = max_ops
        self._max_heartbeats = max_heartbeats
        self.refused = 0
        self.accepted: Counter[str] = Counter()
        """Writes taken into the buffer since start, by kind (``heartbeat`` included)."""

    def add(self, kind: str, *args: Any) -> None:
        if len(self.ops) >= self._max_ops:
            self.refused += 1
            raise BufferFull(
                f"registry degraded and its write buffer is full ({self._max_ops} "
                "writes); retry once Redis is back"
            )
        self.ops.append((kind, args))
        self.accepted[kind] += 1

    def add_heartbeat(self, hb: HeartbeatIn) -> None:
        """The latest heartbeat per node is all that matters (liveness, metrics)."""
        if hb.node_id not in self.heartbeats and len(self.heartbeats) >= self._max_heartbeats:
            self.refused += 1
            raise BufferFull(
                f"registry degraded and {self._max_heartbeats} nodes' heartbeats "
                "are buffered; retry once Redis is back"
            )
        self.heartbeats[hb.node_id] = hb
        self.accepted["heartbeat"] += 1


class LocalSlots:
    """Slots granted from the local view while Redis is unreachable (policy ``local``).

    A grant needs the node ONLINE in the replica with a free slot counting this
    sidecar's earlier grants, and at most ``budget`` grants per node per outage. Each is
    buffered as a ``reserve`` write and replayed in order on recovery, where it is
    recorded even on a node that filled up meanwhile: it was acknowledged. So a node's
    overcommit is bounded by the grants other sidecars made on it during the same
    outage: at most ``budget`` x (sidecars that were degraded) slots beyond capacity.
    """

    def __init__(self, replica: Replica, buffer: WriteBuffer, budget: int) -> None:
        self._replica = replica
        self._buffer = buffer
        self.budget = budget
        self.granted: dict[str, dict[str, int]] = {}
        """node_id -> job_id -> lease deadline (ms, wall clock), not yet replayed."""
        self.counts: Counter[str] = Counter()
        """granted, renewed, replayed, dropped (no longer applicable on replay)."""

    async def reserve(self, node_id: str, job_id: str, lease_ms: int) -> Reservation:
        holder = await self.job_holder(job_id)
        if holder is not None and holder != node_id:
            raise AlreadyExists(f"job {job_id!r} already holds a slot on node {holder!r}", holder)
        node = self._replica.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered")
        grants = self.granted.get(node_id, {})
        created = job_id not in grants
        if created:
            if node.status is not NodeStatus.ONLINE:
                raise FailedPrecondition(f"node {node_id!r} is {node.status.value}, not ONLINE")
            if node.running_jobs + len(grants) >= node.capacity:
                raise ResourceExhausted(f"node {node_id!r} has no free slot")
            if len(grants) >= self.budget:
                raise ResourceExhausted(
                    f"node {node_id!r}: this sidecar's local budget of {self.budget} "
                    "slots is used while Redis is unreachable; retry once it is back"
                )
        self._buffer.add("reserve", node_id, job_id, lease_ms)  # BufferFull: refused
        deadline = int(time.time() * 1000) + lease_ms
        self.granted.setdefault(node_id, {})[job_id] = deadline
        self.counts["granted" if created else "renewed"] += 1
        view = replace(node, running_jobs=node.running_jobs + len(self.granted[node_id]))
        return Reservation(view, created, deadline, buffered=True)

    async def job_holder(self, job_id: str) -> str | None:
        """The node of this sidecar's local grant for the job (Redis is out of reach)."""
        for node_id, grants in self.granted.items():
            if job_id in grants:
                return node_id
        return None

    def release(self, node_id: str, job_id: str) -> None:
        """A buffered release of a local grant frees its budget now (both replay in order)."""
        grants = self.granted.get(node_id)
        if grants is not None and grants.pop(job_id, None) is not None and not grants:
            del self.granted[node_id]

    def replayed(self, node_id: str, job_id: str, applied: bool) -> None:
        self.release(node_id, job_id)
        self.counts["replayed" if applied else "dropped"] += 1


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
        watchdog: Callable[[], Callable[[], None]] | None = None,
        watchdog_interval_s: float = 0.01,
    ) -> None:
        self._gateway = gateway
        self._replica = replica
        self._feed = feed
        self._l2 = l2_s
        self._live_nodes = live_nodes
        self._jitter = stampede_jitter_s
        self._probe_max = probe_max_s
        self._rng = rng or random.Random()
        self.buffer = WriteBuffer(max_ops, max_heartbeats)
        self.local = LocalSlots(replica, self.buffer, local_slot_budget)
        """Slots granted while degraded (policy ``local``); budget 0 under ``reject``."""
        self._mode = Mode.NORMAL
        self._since = 0.0
        self._confirming: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.outages = 0
        self.tripped_at: deque[float] = deque(maxlen=100)
        """Monotonic time of each recent trip (time-to-degraded figures)."""
        self.recovered_at: deque[float] = deque(maxlen=100)
        self.last_outage_ms = 0
        self.rebuilds = 0
        self._last_tick = time.monotonic()
        self.loop_lags: deque[float] = deque(maxlen=int(1 / LOOP_TICK_S))
        """How late the loop ticker woke, over about the last second."""
        self._detected_at: float | None = None
        """Set by the watchdog thread the moment it sees Redis fail (GIL-atomic)."""
        self._ticker: asyncio.Task[None] | None = None
        self._watchdog_factory = watchdog
        self._watchdog_interval = watchdog_interval_s
        self._watchdog: Watchdog | None = None
        gateway.observer = self.observe

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.create_task(self._tick_loop(), name="loop-tick")
        if self._watchdog_factory is not None:
            self._watchdog = Watchdog(
                self._watchdog_factory,
                self._watchdog_interval,
                lambda why: self._trip_from_thread(loop, why),
            )
            self._watchdog.start()

    async def _tick_loop(self) -> None:
        """Marks the event loop as responsive; a stall shows as an old mark. How late each
        tick wakes is the loop's lag (kept for the metrics)."""
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(LOOP_TICK_S)
            now = time.monotonic()
            self.loop_lags.append(max(now - self._last_tick - LOOP_TICK_S, 0.0))
            self._last_tick = now

    # --- state ------------------------------------------------------------------------

    def _trip_from_thread(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
        """From the watchdog thread: degraded from this instant (a flag every handler
        reads), the mode change and recovery follow on the loop."""
        self._detected_at = time.monotonic()
        loop.call_soon_threadsafe(self.trip, why)

    @property
    def degraded(self) -> bool:
        return self._mode is not Mode.NORMAL or self._detected_at is not None

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

    def _set(self, mode: Mode, why: str) -> None:
        if mode is self._mode:
            return
        self.transitions[(self._mode.value, mode.value)] += 1
        log.warning("mode %s -> %s: %s", self._mode.value, mode.value, why)
        self._mode = mode

    # --- breaker ----------------------------------------------------------------------

    def observe(self, failure: str | None, detail: str = "") -> None:
        """The outcome of one hot-path Redis call: None, "timeout" or "error"."""
        if failure is None or self.degraded:
            return
        if failure != "timeout":
            self.trip(detail)
            return
        if time.monotonic() - self._last_tick < LOOP_LAG_S:
            # The loop was responsive: the timeout is Redis's, not a stall of ours.
            self.trip(f"Redis timeout ({detail})")
            return
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.get_running_loop().create_task(self._confirm())

    async def _confirm(self) -> None:
        """One timeout may be a blip; a PING that also times out is not."""
        try:
            await self._gateway.ping()
        except Unavailable as exc:
            self.trip(f"timeout confirmed by PING: {exc}")

    def trip(self, why: str) -> None:
        detected, self._detected_at = self._detected_at, None
        if self._mode is not Mode.NORMAL:
            return
        self._since = detected if detected is not None else time.monotonic()
        self.tripped_at.append(self._since)
        self.outages += 1
        self._set(Mode.L2_ONLY, why)
        self._recovery = asyncio.get_running_loop().create_task(self._recover(), name="recovery")

    async def aclose(self) -> None:
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.stop)
        for task in (self._confirming, self._recovery, self._ticker):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # --- writes -----------------------------------------------------------------------

    async def settled(self) -> bool:
        """After a failed call: wait for a pending timeout confirmation (one hot timeout
        or so), then say whether the sidecar is degraded."""
        task = self._confirming
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=1.0)
        return self.degraded

    async def write(
        self, kind: str, args: tuple[Any, ...], call: Callable[[], Awaitable[T]]
    ) -> T | None:
        """Run a buffered-when-degraded write: its result, or None when it was buffered
        (Redis was down, or the call failed and tripped the breaker). A repeat of a write
        that did reach Redis is harmless on replay: the scripts are idempotent."""
        if not self.degraded:
            try:
                return await call()
            except Unavailable as exc:
                # Redis failed this write (the breaker may already know): degrade and
                # keep the write; if it did reach Redis, the replay repeats it harmlessly.
                self.trip(f"{kind} failed: {exc}")
        self.buffer.add(kind, *args)
        return None

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

    # --- recovery ---------------------------------------------------------------------

    async def _recover(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Unavailable),
            wait=wait_exponential_jitter(multiplier=0.02, max=self._probe_max, jitter=0.05),
            before_sleep=self._tick,
        )
        async for attempt in retrying:
            with attempt:
                await self._recover_once()
        self.last_outage_ms = self.degraded_ms
        self.recovered_at.append(time.monotonic())
        self._set(Mode.NORMAL, f"Redis back after {self.last_outage_ms} ms; buffer replayed")

    def _tick(self, _: object) -> None:
        """Between probes: let the mode move from L2_ONLY to LOCAL_ONLY on time."""
        _ = self.mode

    async def _recover_once(self) -> None:
        gateway, replica = self._gateway, self._replica
        await gateway.ping()
        # The replica's version before asking: the feed may apply newer entries while
        # the answer is on its way (other sidecars write), so comparing with the
        # replica's version after it would see a Redis "behind" that lost nothing.
        had = replica.version
        epoch = await gateway.read_epoch()
        version = await gateway.version()
        lost = epoch != gateway.epoch or version < had
        await asyncio.sleep(self._rng.uniform(0, self._jitter))  # no stampede
        if lost:
            await self._rebuild(epoch, version)
        await self._replay()
        if lost:
            await self._feed.reload()
        else:
            await self._feed.catch_up()

    async def _rebuild(self, epoch: str | None, version: int) -> None:
        """Redis lost the data set: put back what this sidecar knows to be alive."""
        gateway, replica = self._gateway, self._replica
        old = gateway.epoch
        await gateway.ensure_epoch()
        await gateway.lift(replica.version)
        live = [n for i in self._live_nodes() if (n := replica.get(i)) is not None]
        for node in live:
            await gateway.register(spec_of(node), node.ttl_ms, adopt_ms=adopt_window(node))
            if node.status is NodeStatus.DRAINING:  # an operator's drain outlives the loss
                await gateway.drain(node.node_id)
        for pool in list(replica.pools.values()):
            await gateway.put_pool(pool)
        self.rebuilds += 1
        log.warning(
            "Redis lost the registry (epoch %s -> %s, version %d, replica at %d): "
            "registered %d live nodes and %d pools again",
            old,
            gateway.epoch,
            version,
            replica.version,
            len(live),
            len(replica.pools),
        )

    async def _replay(self) -> None:
        """Replay buffered writes in order, then the latest heartbeat of each node. An
        entry leaves the buffer only once Redis has it, so a failure midway loses
        nothing, and a repeat is harmless (the scripts are idempotent)."""
        gateway, buffer = self._gateway, self.buffer
        replayed = 0
        while buffer.ops or buffer.heartbeats:
            while buffer.ops:
                kind, args = buffer.ops[0]
                await self._apply(kind, args)
                buffer.ops.popleft()
                replayed += 1
            beats = list(buffer.heartbeats.values())[:HEARTBEAT_REPLAY_BATCH]
            results = await asyncio.gather(*(gateway.heartbeat(hb) for hb in beats))
            for hb, result in zip(beats, results, strict=True):
                if result.outcome is not HeartbeatOutcome.OK:
                    # Expired meanwhile, or lost with Redis: register it again from what
                    # it registered last, then record the heartbeat.
                    node = self._replica.get(hb.node_id)
                    if node is not None:
                        await gateway.register(
                            spec_of(node), node.ttl_ms, adopt_ms=adopt_window(node)
                        )
                        await gateway.heartbeat(hb)
                if buffer.heartbeats.get(hb.node_id) is hb:
                    del buffer.heartbeats[hb.node_id]
            replayed += len(beats)
        if replayed:
            log.info("replayed %d buffered writes and heartbeats", replayed)

    async def _apply(self, kind: str, args: tuple[Any, ...]) -> None:
        calls: dict[str, Callable[..., Awaitable[object]]] = {
            "register": self._gateway.register,
            "deregister": self._gateway.deregister,
            "drain": self._gateway.drain,
            "release": self._gateway.release,
            "put_pool": self._gateway.put_pool,
            "reserve": self._replay_reserve,
        }
        call = calls[kind]
        try:
            await call(*args)
        except Unavailable:
            raise
        except RegistryError as exc:  # e.g. drain of a node removed meanwhile
            log.info("buffered %s%s no longer applies: %s", kind, args[:2], exc)

    async def _replay_reserve(self, node_id: str, job_id: str, lease_ms: int) -> None:
        """A local grant reaches Redis (recorded even beyond capacity), or is dropped."""
        try:
            await self._gateway.reserve(node_id, job_id, lease_ms, replay=True)
        except Unavailable:
            raise  # stays buffered; the next probe replays it
        except RegistryError:
            self.local.replayed(node_id, job_id, applied=False)
            raise
        self.local.replayed(node_id, job_id, applied=True)


def adopt_window(node: Node) -> int:
    """How long a node registered again after a loss may bring back its jobs' slots by
    reporting them: a few heartbeats (three per TTL) at least, and 10 s."""
    return max(2 * node.ttl_ms, 10_000)


def spec_of(node: Node) -> NodeSpec:
    """What a node registered last, as the replica knows it."""
    return NodeSpec(
        node_id=node.node_id,
        address=node.address,
        pools=tuple(sorted(node.pools)),
        lang_pairs=tuple(sorted(node.lang_pairs, key=lambda p: (p.src, p.tgt))),
        services=node.services,
        labels=dict(node.labels),
        capacity=node.capacity,
    )
