"""Fault injection under load: Redis killed, frozen, restarted empty, slowed, or losing
replies, while 50 nodes heartbeat and 4 schedulers select and schedule through 2
sidecars. Each test prints its figures; docs/reliability.md collects them.

Run: ``.venv/bin/python -m pytest tests/faults -m slow -s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.support.redis_proc import RedisProcess

pytestmark = pytest.mark.slow

Stub = pb_grpc.RegistryServiceStub
NODES = 50
HEARTBEAT_S = 0.2
TTL_MS = 5_000
CAPACITY = 4


@dataclass
class Figures:
    reads: int = 0
    failed_reads: int = 0
    heartbeats_acked: int = 0
    heartbeats_buffered: int = 0
    heartbeat_errors: int = 0
    scheduled: int = 0
    schedule_refused: int = 0
    released: int = 0
    degraded_at: dict[str, float] = field(default_factory=dict)
    normal_at: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    """The cpu figure of each node's last acknowledged heartbeat."""
    in_flight: dict[str, float] = field(default_factory=dict)
    """The cpu figure of a heartbeat sent after it and never answered (the rig stopped):
    it may have reached Redis, which then legitimately holds it."""
    held: dict[str, str] = field(default_factory=dict)
    """Jobs holding a slot, as the schedulers know it: job -> node."""
    uncertain: set[str] = field(default_factory=set)
    """Schedules that failed UNAVAILABLE: the reserve may have run with its reply lost.
    A correct client retries them with the same job id (Schedule is idempotent)."""
    resolved_held: int = 0
    releasing: dict[str, str] = field(default_factory=dict)
    """Releases whose answer did not come (job -> node): retried, they are idempotent."""


class Rig:
    """Steady load on 2 sidecars over one Redis; stops by itself when closed."""

    def __init__(self, sidecars: list[Sidecar], stubs: list[Stub]) -> None:
        self.sidecars = sidecars
        self.stubs = stubs
        self.f = Figures()
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._rng = random.Random(7)

    async def start(self) -> None:
        for i in range(NODES):
            await self.stubs[i % 2].RegisterNode(
                pb.RegisterNodeRequest(
                    node=pb.Node(node_id=f"n{i:02}", capacity=CAPACITY, pools=["p"]), ttl_ms=TTL_MS
                )
            )
        for i in range(NODES):
            self._tasks.append(asyncio.create_task(self._heartbeat(f"n{i:02}", i % 2)))
        for k in range(4):
            self._tasks.append(asyncio.create_task(self._scheduler(k)))
        self._tasks.append(asyncio.create_task(self._watch_modes()))
        await asyncio.sleep(1.0)  # steady state

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _heartbeat(self, node_id: str, side: int) -> None:
        seq = 0
        while not self._stop.is_set():
            call = self.stubs[side].Heartbeat()
            try:
                while not self._stop.is_set():
                    seq += 1
                    cpu = round(self._rng.random(), 2)
                    self.f.in_flight[node_id] = cpu
                    await call.write(
                        pb.HeartbeatRequest(
                            node_id=node_id, seq=seq, metrics=pb.NodeMetrics(cpu=cpu)
                        )
                    )
                    reply = await call.read()
                    del self.f.in_flight[node_id]
                    assert reply.seq == seq
                    if reply.action == pb.HEARTBEAT_ACTION_REGISTER:
                        await self.stubs[side].RegisterNode(
                            pb.RegisterNodeRequest(
                                node=pb.Node(node_id=node_id, capacity=CAPACITY, pools=["p"]),
                                ttl_ms=TTL_MS,
                            )
                        )
                        continue
                    self.f.last_metrics[node_id] = cpu
                    if reply.action == pb.HEARTBEAT_ACTION_BUFFERED:
                        self.f.heartbeats_buffered += 1
                    else:
                        self.f.heartbeats_acked += 1
                    await asyncio.sleep(HEARTBEAT_S)
            except grpc.aio.AioRpcError:
                self.f.heartbeat_errors += 1
                await asyncio.sleep(0.05)
            finally:
                call.cancel()

    async def _scheduler(self, k: int) -> None:
        stub = self.stubs[k % 2]
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                self.f.reads += 1
                await stub.SelectNodes(pb.SelectNodesRequest(pool_id="p", count=3), timeout=1)
            except grpc.aio.AioRpcError:
                self.f.failed_reads += 1
            job = f"s{k}-{n}"
            self.f.uncertain.add(job)  # until a definite answer (the rig may stop midway)
            try:
                reply = await stub.Schedule(
                    pb.ScheduleRequest(
                        selector=pb.SelectNodesRequest(pool_id="p"), job_id=job, lease_ms=30_000
                    ),
                    timeout=1,
                )
                self.f.held[job] = reply.node.node_id
                self.f.uncertain.discard(job)
                self.f.scheduled += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), exc
                self.f.schedule_refused += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.f.uncertain.discard(job)
            if len(self.f.held) > 40:
                old, node = next(iter(self.f.held.items()))
                del self.f.held[old]
                self.f.releasing[old] = node
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.ReleaseSlot(
                        pb.ReleaseSlotRequest(node_id=node, job_id=old), timeout=1
                    )
                    del self.f.releasing[old]
                    self.f.released += 1
            await asyncio.sleep(0.02)

    async def _watch_modes(self) -> None:
        """Record, to the millisecond, when each sidecar degrades and recovers."""
        was = {sc.address: False for sc in self.sidecars}
        while not self._stop.is_set():
            now = time.monotonic()
            for sc in self.sidecars:
                degraded = sc.degradation.degraded
                if degraded and not was[sc.address]:
                    self.f.degraded_at.setdefault(sc.address, now)
                if not degraded and was[sc.address]:
                    self.f.normal_at[sc.address] = now
                was[sc.address] = degraded
            await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def rig(
    sidecar_factory: SidecarFactory, url: str, namespace: str, **settings: object
) -> AsyncIterator[Rig]:
    options = {
        "watchdog_timeout_ms": 30,  # the production floor of the failure detector
        "min_ttl_ms": 500,
        "reconcile_grace_ms": 60_000,
        "self_preservation_pause_ms": 1_000,
        **settings,
    }
    sidecars = [await sidecar_factory(url, namespace, **options) for _ in range(2)]
    channels = [grpc.aio.insecure_channel(sc.address) for sc in sidecars]
    r = Rig(sidecars, [Stub(c) for c in channels])
    try:
        await r.start()
        yield r
    finally:
        await r.close()
        for c in channels:
            await c.close()


async def settle(r: Rig, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(sc.degradation.settled for sc in r.sidecars):
        assert time.monotonic() < deadline, "did not return to NORMAL"
        await asyncio.sleep(0.01)


async def resolve_uncertain(r: Rig) -> None:
    """Retry every Schedule whose outcome the scheduler could not know, with its job id:
    a lost reply shows up as created=false on the node that holds the slot."""
    for job, node in sorted(r.f.releasing.items()):
        await r.stubs[0].ReleaseSlot(pb.ReleaseSlotRequest(node_id=node, job_id=job))

    async def schedule(job: str) -> pb.ScheduleResponse:
        request = pb.ScheduleRequest(
            selector=pb.SelectNodesRequest(pool_id="p"), job_id=job, lease_ms=30_000
        )
        reply: pb.ScheduleResponse = await r.stubs[0].Schedule(request)
        return reply

    # UNAVAILABLE is the contract's "retry": on a loaded machine a hot-path call can
    # still time out just after the return to NORMAL, as a scheduler would see it too.
    retrying = AsyncRetrying(
        retry=retry_if_exception(
            lambda e: (
                isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE
            )
        ),
        wait=wait_exponential_jitter(multiplier=0.05, max=0.5),
        stop=stop_after_attempt(10),
        reraise=True,
    )
    for job in sorted(r.f.uncertain):
        try:
            reply = await retrying(schedule, job)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            continue
        r.f.held[job] = reply.node.node_id
        if not reply.created:
            r.f.resolved_held += 1
    print(
        f"uncertain schedules: {len(r.f.uncertain)}, of which had in fact reserved "
        f"(reply lost): {r.f.resolved_held}"
    )


def check_slots(r: Rig, client: object, namespace: str) -> None:
    """No reservation lost or doubled: Redis holds exactly the jobs the schedulers hold
    (the rig releases only what it scheduled, and leases outlive the test)."""
    held_in_redis: dict[str, str] = {}
    for i in range(NODES):
        node_id = f"n{i:02}"
        jobs = [j.decode() for j in client.hkeys(f"{{{namespace}}}:jobs:{node_id}")]  # type: ignore[attr-defined]
        running = int(client.hget(f"{{{namespace}}}:node:{node_id}", "jobs") or 0)  # type: ignore[attr-defined]
        assert running == len(jobs) and 0 <= running <= CAPACITY
        for job in jobs:
            held_in_redis[job] = node_id
    assert held_in_redis == r.f.held


async def check_heartbeats(r: Rig, client: object, namespace: str) -> None:
    """Every acknowledged heartbeat's effect is present once writes settle: each node is
    ONLINE and carries the metrics of its last acknowledged heartbeat (or a later one)."""
    await r.close()
    await settle(r)
    await asyncio.sleep(0.3)
    for node_id, cpu in r.f.last_metrics.items():
        fields = client.hgetall(f"{{{namespace}}}:node:{node_id}")  # type: ignore[attr-defined]
        assert fields[b"status"] == b"ONLINE", node_id
        allowed = [cpu] + ([r.f.in_flight[node_id]] if node_id in r.f.in_flight else [])
        stored = float(fields[b"cpu"])
        assert any(abs(stored - c) < 0.05 + 1e-9 for c in allowed), (node_id, stored, allowed)


def report(name: str, r: Rig, fault_at: float, restored_at: float) -> dict[str, float]:
    """Times come from the sidecars' own records of when the breaker tripped and when
    recovery finished (the test's event loop also runs 54 load tasks, so a poller of its
    own would add its scheduling delay to the figure)."""
    to_degraded = [
        1000 * (next(t for t in sc.degradation.tripped_at if t >= fault_at) - fault_at)
        for sc in r.sidecars
        if any(t >= fault_at for t in sc.degradation.tripped_at)
    ]
    to_normal = [
        1000 * (next(t for t in sc.degradation.recovered_at if t >= restored_at) - restored_at)
        for sc in r.sidecars
        if any(t >= restored_at for t in sc.degradation.recovered_at)
    ]
    figures = {
        "ms_to_degraded_max": max(to_degraded) if to_degraded else -1,
        "ms_to_normal_after_restore_max": max(to_normal) if to_normal else -1,
        "reads": r.f.reads,
        "failed_reads": r.f.failed_reads,
        "heartbeats_acked": r.f.heartbeats_acked,
        "heartbeats_buffered": r.f.heartbeats_buffered,
        "heartbeat_stream_errors": r.f.heartbeat_errors,
        "scheduled": r.f.scheduled,
        "schedule_refused": r.f.schedule_refused,
    }
    print(
        f"\n[{name}] "
        + ", ".join(
            f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
        )
    )
    return figures


async def test_redis_killed_and_restarted_with_its_data(
    sidecar_factory: SidecarFactory, namespace: str
) -> None:
    """kill -9, back after 2 s with its data (append-only file, fsync always)."""
    proc = RedisProcess(["--appendfsync", "always"], appendonly=True)
    proc.start()
    try:
        async with rig(sidecar_factory, proc.url, namespace) as r:
            fault_at = time.monotonic()
            proc.kill()
            await asyncio.sleep(2.0)
            proc.restart(keep_data=True)
            restored_at = time.monotonic()
            await settle(r)
            await asyncio.sleep(1.0)
            figures = report("kill -9, restart after 2 s", r, fault_at, restored_at)
            assert 0 <= figures["ms_to_degraded_max"] < 50
            assert figures["failed_reads"] == 0
            assert all(sc.degradation.rebuilds == 0 for sc in r.sidecars)
            await check_heartbeats(r, proc.client(), namespace)
            await resolve_uncertain(r)
            check_slots(r, proc.client(), namespace)
    finally:
        proc.close()


async def test_redis_frozen_for_two_seconds(
    sidecar_factory: SidecarFactory, namespace: str, redis_proc: RedisProcess
) -> None:
    async with rig(sidecar_factory, redis_proc.url, namespace) as r:
        fault_at = time.monotonic()
        redis_proc.pause()
        await asyncio.sleep(2.0)
        redis_proc.resume()
        restored_at = time.monotonic()
        await settle(r)
        await asyncio.sleep(1.0)
        figures = report("SIGSTOP 2 s", r, fault_at, restored_at)
        # Measured 35-57 ms (one 77 ms) on this 2-core machine with the whole load in
        # this process; the bound here only catches a broken detector, the figure is
        # printed and recorded in docs/reliability.md.
        assert 0 <= figures["ms_to_degraded_max"] < 200
        assert figures["failed_reads"] == 0
        await check_heartbeats(r, redis_proc.client(), namespace)
        await resolve_uncertain(r)
        check_slots(r, redis_proc.client(), namespace)


async def test_redis_restarted_empty_is_rebuilt_from_live_streams(
    sidecar_factory: SidecarFactory, namespace: str, redis_proc: RedisProcess
) -> None:
    async with rig(sidecar_factory, redis_proc.url, namespace) as r:
        watch = r.stubs[1].Watch(pb.WatchRequest())
        versions: list[int] = []

        async def follow() -> None:
            async for event in watch:
                # Snapshot items carry each node's own version, in no order; the live
                # events after SNAPSHOT_END are what must never go backwards.
                if event.type in (
                    pb.WATCH_EVENT_TYPE_PUT,
                    pb.WATCH_EVENT_TYPE_DELETE,
                    pb.WATCH_EVENT_TYPE_BOOKMARK,
                ):
                    versions.append(event.version)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        before = max(sc.replica.version for sc in r.sidecars)
        fault_at = time.monotonic()
        redis_proc.kill()
        redis_proc.restart(keep_data=False)  # --appendonly no: comes back empty
        restored_at = time.monotonic()
        client = redis_proc.client()
        deadline = restored_at + 5
        while client.scard(f"{{{namespace}}}:nodes") < NODES:
            assert time.monotonic() < deadline, "fleet not rebuilt"
            await asyncio.sleep(0.005)
        rebuilt_ms = 1000 * (time.monotonic() - restored_at)
        await settle(r)
        await asyncio.sleep(0.5)
        figures = report("restart empty", r, fault_at, restored_at)
        print(
            f"[restart empty] fleet of {NODES} rebuilt {rebuilt_ms:.0f} ms after restart "
            f"(heartbeat interval {HEARTBEAT_S * 1000:.0f} ms); version before {before}, "
            f"after {int(client.get(f'{{{namespace}}}:ver'))}"
        )
        assert figures["failed_reads"] == 0
        assert rebuilt_ms < HEARTBEAT_S * 1000 + 1_500
        assert int(client.get(f"{{{namespace}}}:ver")) > before, "versions went backwards"
        assert versions and all(b >= a for a, b in itertools.pairwise(versions)), versions
        follower.cancel()
        watch.cancel()
        for i in range(NODES):
            assert client.hget(f"{{{namespace}}}:node:n{i:02}", "status") == b"ONLINE"


class Proxy:
    """A TCP proxy on loopback between a sidecar and Redis: adds latency, or forwards
    commands but drops the replies (the reply-lost case)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.delay = 0.0
        self.drop_replies = False
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            """Each chunk is delivered ``delay`` after it arrived: latency, not a queue."""
            chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

            async def deliver() -> None:
                while (item := await chunks.get()) is not None:
                    at, data = item
                    wait = at - asyncio.get_running_loop().time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if replies and self.drop_replies:
                        continue
                    dst.write(data)
                    await dst.drain()

            sender = asyncio.create_task(deliver())
            try:
                while data := await src.read(65536):
                    chunks.put_nowait((asyncio.get_running_loop().time() + self.delay, data))
            except (ConnectionError, OSError):
                pass
            finally:
                chunks.put_nowait(None)
                with contextlib.suppress(Exception):
                    await sender
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True
        )


async def test_slow_redis_and_lost_replies(
    sidecar_factory: SidecarFactory, namespace: str, redis_proc: RedisProcess
) -> None:
    proxy = Proxy(redis_proc.port)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        async with rig(sidecar_factory, url, namespace) as r:

            def outages() -> int:
                return sum(sc.degradation.outages for sc in r.sidecars)

            steps, later = {}, {}
            for delay_ms in (5, 50, 200):
                before = outages()
                proxy.delay = delay_ms / 1000
                await asyncio.sleep(delay_ms / 1000 + 0.3)
                stepped = outages()
                await asyncio.sleep(1.0)
                steps[delay_ms], later[delay_ms] = stepped - before, outages() - stepped
                proxy.delay = 0
                await settle(r)
            print(
                f"\n[latency] outages when the latency stepped up by +5 / +50 / +200 ms: "
                f"{steps[5]} / {steps[50]} / {steps[200]}; in the second after: "
                f"{later[5]} / {later[50]} / {later[200]} (detector floor 30 ms)"
            )
            # A slow Redis is not down. A sudden step past the threshold looks like a
            # freeze for as long as the step (nothing answers meanwhile), so each sidecar
            # may trip once; then the threshold has learned the late answer and a Redis
            # that keeps answering slowly never trips it again.
            assert steps[5] == 0
            assert steps[50] <= 2 and steps[200] <= 2
            assert later == {5: 0, 50: 0, 200: 0}
            # Replies lost while commands still reach Redis: the writes were applied, the
            # sidecar cannot know, degrades, buffers, and replays them; idempotent scripts
            # keep the replay from applying anything twice.
            proxy.drop_replies = True
            fault_at = time.monotonic()
            await asyncio.sleep(1.0)
            proxy.drop_replies = False
            restored_at = time.monotonic()
            await settle(r)
            await asyncio.sleep(1.0)
            report("lost replies for 1 s", r, fault_at, restored_at)
            assert r.f.failed_reads == 0
            await check_heartbeats(r, redis_proc.client(), namespace)
            await resolve_uncertain(r)
            check_slots(r, redis_proc.client(), namespace)
    finally:
        await proxy.close()
