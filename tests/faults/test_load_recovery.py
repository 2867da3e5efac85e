"""Recovery always finishes: a Redis outage in the middle of a heartbeat load that keeps
the sidecars saturated (a closed loop: every stream has 8 heartbeats in flight at all
times, so the offered load is whatever the sidecars can take), before, during and after.

Before issue 10 the replay could livelock: live heartbeats refilled the buffer as fast as
it drained, and an outage ended only when the load stopped. Now the sidecar is NORMAL as
soon as Redis answers, live writes go straight to Redis, and the buffer drains in
bounded rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.support.redis_proc import RedisProcess

pytestmark = pytest.mark.slow

STREAMS = 60
WINDOW = 8


class Load:
    """Closed-loop heartbeat streams; counts acks by action, per phase."""

    def __init__(self, stubs: list[pb_grpc.RegistryServiceStub]) -> None:
        self.stubs = stubs
        self.acks: dict[int, int] = {}
        self.errors = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i in range(STREAMS):
            self._tasks.append(asyncio.create_task(self._stream(i)))

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def total(self) -> int:
        return sum(self.acks.values())

    async def _stream(self, i: int) -> None:
        node_id = f"n{i:03}"
        call = self.stubs[i % 2].Heartbeat()
        room = asyncio.Semaphore(WINDOW)

        async def reader() -> None:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                self.acks[reply.action] = self.acks.get(reply.action, 0) + 1
                room.release()

        reading = asyncio.create_task(reader())
        try:
            seq = 0
            while not self._stop.is_set():
                await room.acquire()
                seq += 1
                cpu = (seq % 10) / 10
                await call.write(
                    pb.HeartbeatRequest(node_id=node_id, seq=seq, metrics=pb.NodeMetrics(cpu=cpu))
                )
        except grpc.aio.AioRpcError:
            self.errors += 1
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            call.cancel()


async def rate(load: Load, seconds: float) -> float:
    before = load.total()
    await asyncio.sleep(seconds)
    return (load.total() - before) / seconds


async def test_recovery_finishes_under_a_saturating_heartbeat_load(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sidecars: list[Sidecar] = [
        await sidecar_factory(redis_proc.url, namespace, watchdog_timeout_ms=40, min_ttl_ms=500)
        for _ in range(2)
    ]
    channels = [grpc.aio.insecure_channel(sc.address) for sc in sidecars]
    stubs = [pb_grpc.RegistryServiceStub(c) for c in channels]
    for i in range(STREAMS):
        await stubs[i % 2].RegisterNode(
            pb.RegisterNodeRequest(node=pb.Node(node_id=f"n{i:03}", capacity=1), ttl_ms=30_000)
        )
    load = Load(stubs)
    load.start()
    try:
        await asyncio.sleep(1.0)
        capacity = await rate(load, 2.0)  # saturating: this is what the sidecars take
        outages = [sc.degradation.outages for sc in sidecars]
        redis_proc.pause()
        await asyncio.sleep(1.5)
        redis_proc.resume()
        resumed = time.monotonic()
        while any(sc.degradation.degraded for sc in sidecars):
            assert time.monotonic() - resumed < 5, "not NORMAL 5 s after Redis came back"
            await asyncio.sleep(0.01)
        normal_ms = 1000 * (time.monotonic() - resumed)
        while not all(sc.degradation.settled for sc in sidecars):
            assert time.monotonic() - resumed < 10, "buffer not drained under load"
            await asyncio.sleep(0.01)
        drained_ms = 1000 * (time.monotonic() - resumed)
        after = await rate(load, 2.0)  # the load never paused
        buffered_after = load.acks.get(pb.HEARTBEAT_ACTION_BUFFERED, 0)
        trips = [sc.degradation.outages - o for sc, o in zip(sidecars, outages, strict=True)]
        await asyncio.sleep(1.0)
        assert load.acks.get(pb.HEARTBEAT_ACTION_BUFFERED, 0) == buffered_after, (
            "nothing is buffered once NORMAL, under the same load"
        )
        print(
            f"\n[recovery under load] capacity {capacity:.0f} acks/s before, {after:.0f} after; "
            f"NORMAL {normal_ms:.0f} ms and buffer drained {drained_ms:.0f} ms after Redis "
            f"returned; outages {trips}; "
            f"superseded {[sc.degradation.buffer.superseded for sc in sidecars]}"
        )
        assert after > 0.5 * capacity
        assert load.errors == 0
    finally:
        await load.close()
        for c in channels:
            await c.close()
