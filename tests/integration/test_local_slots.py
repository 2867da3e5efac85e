"""Reservation policy ``local``: slots granted from the local view while Redis is frozen,
replayed on recovery; overcommit bounded by the budget, nothing acknowledged lost,
nothing applied twice; and a recovery racing other writers. (Policy ``reject`` is
covered in test_sidecar.py too.)"""

from __future__ import annotations

import grpc
import pytest

from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import eventually, register
from tests.support.redis_proc import RedisProcess

pytestmark = pytest.mark.timeout(60)

Stub = pb_grpc.RegistryServiceStub
LOCAL = {"reservation_policy": "local", "local_slot_budget": 1, "watchdog_timeout_ms": 25}


def holders(redis_proc: RedisProcess, namespace: str) -> dict[str, str]:
    raw = redis_proc.client().hgetall(f"{{{namespace}}}:jobnode")
    return {k.decode(): v.decode() for k, v in raw.items()}


def running(redis_proc: RedisProcess, namespace: str, node_id: str) -> int:
    client = redis_proc.client()
    jobs = client.hlen(f"{{{namespace}}}:jobs:{node_id}")
    field = client.hget(f"{{{namespace}}}:node:{node_id}", "jobs")
    assert int(field or 0) == jobs, "the node's running_jobs must equal its live reservations"
    return int(jobs)


async def degraded(*sidecars: Sidecar) -> None:
    await eventually(lambda: all(sc.degradation.degraded for sc in sidecars), timeout=2)


async def recovered(*sidecars: Sidecar) -> None:
    await eventually(lambda: all(sc.degradation.settled for sc in sidecars), timeout=10)


async def test_slots_granted_locally_reach_redis_on_recovery(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(redis_proc.url, namespace, **LOCAL)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1", capacity=2)
        await register(stub, "n2", capacity=2)
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="before"))
        await eventually(lambda: (n := sc.replica.get("n1")) is not None and n.running_jobs == 1)
        redis_proc.pause()
        try:
            await degraded(sc)
            got = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
            assert got.buffered and got.created and got.node.running_jobs == 2
            again = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
            assert again.buffered and not again.created  # a retry renews, takes no slot
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j2"))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            scheduled = await stub.Schedule(
                pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="j3")
            )
            assert scheduled.buffered and scheduled.node.node_id == "n2"
            retried = await stub.Schedule(
                pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="j3")
            )
            assert retried.node.node_id == "n2" and not retried.created
            # n2's budget is spent: a third job finds no slot this sidecar may promise.
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await stub.Schedule(
                    pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="j4")
                )
            assert none.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="ghost", job_id="j5"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            redis_proc.resume()
        await recovered(sc)

    assert holders(redis_proc, namespace) == {"before": "n1", "j1": "n1", "j3": "n2"}
    assert running(redis_proc, namespace, "n1") == 2
    assert running(redis_proc, namespace, "n2") == 1
    assert sc.degradation.local.granted == {}
    assert sc.degradation.local.counts["granted"] == 2
    assert sc.degradation.local.counts["dropped"] == 0


async def test_a_local_release_frees_the_budget_and_replays_in_order(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(redis_proc.url, namespace, **LOCAL)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1", capacity=4)
        redis_proc.pause()
        try:
            await degraded(sc)
            await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
            released = await stub.ReleaseSlot(pb.ReleaseSlotRequest(node_id="n1", job_id="j1"))
            assert released.released
            got = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j2"))
            assert got.buffered and got.created
        finally:
            redis_proc.resume()
        await recovered(sc)
    assert holders(redis_proc, namespace) == {"j2": "n1"}
    assert running(redis_proc, namespace, "n1") == 1


async def test_two_sidecars_overcommit_a_node_by_at_most_their_budgets(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    """Both see n1's one free slot and grant it: the replay records both (each was
    acknowledged), so n1 runs capacity + 1 = capacity + budget x (sidecars - 1)."""
    a = await sidecar_factory(redis_proc.url, namespace, **LOCAL)
    b = await sidecar_factory(redis_proc.url, namespace, **LOCAL)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        await register(Stub(ca), "n1", capacity=1)
        await eventually(lambda: b.replica.get("n1") is not None)
        redis_proc.pause()
        try:
            await degraded(a, b)
            for stub, job in ((Stub(ca), "ja"), (Stub(cb), "jb")):
                got = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id=job))
                assert got.buffered and got.created
        finally:
            redis_proc.resume()
        await recovered(a, b)
    assert holders(redis_proc, namespace) == {"ja": "n1", "jb": "n1"}
    assert running(redis_proc, namespace, "n1") == 2  # capacity 1, overcommit 1


async def test_a_job_holding_a_slot_elsewhere_is_not_doubled_on_replay(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    """The local view has no job map: a job already placed on n2 (in Redis) can be
    granted on n1 locally. The replay finds the holder and drops the local grant."""
    sc = await sidecar_factory(redis_proc.url, namespace, **LOCAL)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1", capacity=2)
        await register(stub, "n2", capacity=2)
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n2", job_id="jx"))
        redis_proc.pause()
        try:
            await degraded(sc)
            got = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="jx"))
            assert got.buffered
        finally:
            redis_proc.resume()
        await recovered(sc)
    assert holders(redis_proc, namespace) == {"jx": "n2"}
    assert running(redis_proc, namespace, "n1") == 0
    assert sc.degradation.local.counts["dropped"] == 1


async def test_policy_reject_is_the_default(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(redis_proc.url, namespace, watchdog_timeout_ms=25)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1", capacity=2)
        redis_proc.pause()
        try:
            await degraded(sc)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Schedule(
                    pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="j")
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            redis_proc.resume()
        await recovered(sc)
    assert holders(redis_proc, namespace) == {}


async def test_recovery_while_others_write_is_not_taken_for_lost_data(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    """The version Redis gave during recovery is older than what the feed applies while
    the answer travels (another sidecar keeps writing): that is no data loss, and must
    not set off a rebuild."""
    a = await sidecar_factory(redis_proc.url, namespace)
    b = await sidecar_factory(redis_proc.url, namespace)
    async with grpc.aio.insecure_channel(b.address) as channel:
        stub = Stub(channel)
        await register(stub, "n0")
        real_version = a.gateway.version

        async def answer_delayed() -> int:
            version = await real_version()
            for i in range(1, 4):  # written, and applied by a's feed, after Redis answered
                await register(stub, f"n{i}")
            await eventually(lambda: a.replica.version > version)
            return version

        a.gateway.version = answer_delayed  # type: ignore[method-assign]
        a.degradation.trip("test: a recovery races the feed")
        await recovered(a)
    assert a.degradation.rebuilds == 0
