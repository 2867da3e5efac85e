"""Nothing acknowledged is lost on restart: a degraded sidecar's buffered writes live in
its journal and reach Redis after a restart (registry/degradation/journal.py)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from registry.degradation import JournalLocked
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import eventually, register
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub


async def test_a_restarted_degraded_sidecar_replays_every_acknowledged_write(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = await sidecar_factory(
        redis_proc.url, namespace, watchdog_timeout_ms=25, data_dir=data_dir
    )
    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = Stub(channel)
        for node_id in ("n1", "n2", "n3"):
            await register(stub, node_id, pools=["p"])
        redis_proc.pause()
        try:
            await eventually(lambda: first.degradation.degraded, timeout=2)
            registered = 0
            for i in range(40):  # registrations acknowledged while Redis is frozen
                await register(stub, f"new{i:02}", pools=["p"])
                registered += 1
            await stub.DrainNode(pb.DrainNodeRequest(node_id="n1"), timeout=2)
            await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n2"), timeout=2)
            await stub.PutPool(
                pb.PutPoolRequest(pool=pb.Pool(pool_id="later", min_health=0.5)), timeout=2
            )
            beats = stub.Heartbeat()
            await beats.write(
                pb.HeartbeatRequest(node_id="n3", seq=1, metrics=pb.NodeMetrics(cpu=0.7))
            )
            ack = await beats.read()
            assert ack.action == pb.HEARTBEAT_ACTION_BUFFERED
            beats.cancel()
            status = await stub.GetStatus(pb.GetStatusRequest())
            assert status.buffered_writes == registered + 3 and status.buffered_heartbeats == 1
            await first.aclose()  # a restart while degraded: the journal keeps them
        finally:
            redis_proc.resume()

    second = await sidecar_factory(redis_proc.url, namespace, data_dir=data_dir)
    await eventually(lambda: second.degradation.settled, timeout=10)
    client = redis_proc.client()
    ns = "{" + namespace + "}"
    for i in range(registered):
        assert client.exists(f"{ns}:node:new{i:02}"), f"new{i:02} lost"
    assert client.hget(f"{ns}:node:n1", "status") == b"DRAINING"
    assert not client.exists(f"{ns}:node:n2")
    assert client.exists(f"{ns}:pool:later")
    assert float(client.hget(f"{ns}:node:n3", "cpu") or 0) == pytest.approx(0.7)
    journal = data_dir / f"journal-{namespace}.jsonl"
    assert journal.stat().st_size == 0, "a drained buffer empties the journal"


async def test_two_sidecars_cannot_share_a_data_directory(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    await sidecar_factory(redis_proc.url, namespace, data_dir=tmp_path)
    with pytest.raises(JournalLocked, match="data directory of its own"):
        await sidecar_factory(redis_proc.url, namespace, data_dir=tmp_path)
