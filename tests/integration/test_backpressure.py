"""Backpressure end to end: a flooded ingest queue stretches the interval acks suggest and
the deadline Redis sets alike, and a full one holds streams back (registry/backpressure.py).
The queue depth is injected: the rule itself is unit-tested in tests/unit."""

from __future__ import annotations

import asyncio
import time

import grpc

from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import heartbeats, register
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub


async def test_pressure_stretches_interval_and_deadline_together(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, heartbeat_max_stretch=2.0)
    client = shared_redis.client()
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1", ttl_ms=3_000)
        (calm,) = await heartbeats(stub, [pb.HeartbeatRequest(node_id="n1", seq=1)])
        assert calm.interval_ms == 1_000
        sc.backpressure._queued = lambda: 3 * 1024  # three times the soft bound
        sc.backpressure.update()
        assert sc.backpressure.factor == 2.0 and sc.gateway.stretch == 2.0
        (pressed,) = await heartbeats(stub, [pb.HeartbeatRequest(node_id="n1", seq=2)])
        assert pressed.interval_ms == 2_000
        now_ms = time.time() * 1000
        deadline = client.zscore(f"{{{namespace}}}:expiry", "n1")
        assert deadline is not None and deadline > now_ms + 5_000, "the deadline stretched too"


async def test_a_full_ingest_queue_holds_streams_until_there_is_room(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1")
        depth = {"queued": 10**6}
        sc.backpressure._queued = lambda: depth["queued"]
        call = stub.Heartbeat()
        await call.write(pb.HeartbeatRequest(node_id="n1", seq=1))
        read = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)
        assert not read.done(), "a full queue takes no more heartbeats"
        assert sc.backpressure.waits == 1
        depth["queued"] = 0
        ack = await asyncio.wait_for(read, 2)
        assert ack.seq == 1 and ack.action == pb.HEARTBEAT_ACTION_CONTINUE
        call.cancel()
