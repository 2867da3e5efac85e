"""The sidecar over real gRPC and a real Redis: the API contract, RPC by RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis

from registry.health import health_score
from registry.model import Metrics
from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub


def make_node(node_id: str = "n1", **kw: object) -> pb.Node:
    base: dict[str, object] = {
        "node_id": node_id,
        "address": f"{node_id}.local:9000",
        "pools": ["p1"],
        "lang_pairs": [pb.LanguagePair(src="en", tgt="de")],
        "services": [pb.InstalledService(name="mt", type="nmt", version="2")],
        "labels": {"zone": "a"},
        "capacity": 2,
    }
    base.update(kw)
    return pb.Node(**base)  # type: ignore[arg-type]


async def register(stub: Stub, node_id: str = "n1", ttl_ms: int = 0, **kw: object) -> pb.Node:
    reply = await stub.RegisterNode(
        pb.RegisterNodeRequest(node=make_node(node_id, **kw), ttl_ms=ttl_ms)
    )
    return reply.node


def dump(client: redis.Redis, namespace: str) -> dict[bytes, bytes | None]:
    """Every key of a namespace with its serialized value: equal dumps, equal state.
    (Leaves out the time of the last expiry run, which moves by itself like hb_at.)"""
    keys = sorted(client.scan_iter(match="{" + namespace + "}:*"))
    return {k: client.dump(k) for k in keys if not k.endswith(b":expiry_run")}


async def eventually(predicate: object, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_register_get_list(stub: Stub) -> None:
    node = await register(stub)
    assert node.status == pb.NODE_STATUS_ONLINE
    assert node.version == 1
    assert node.registered_at > 0 and node.ttl_ms == 10_000
    got = await stub.GetNode(pb.GetNodeRequest(node_id="n1"))
    assert got.node == node
    assert got.freshness.version >= 1 and not got.freshness.degraded

    await register(stub, "n2", pools=["p2"], lang_pairs=[pb.LanguagePair(src="en", tgt="fr")])
    listed = await stub.ListNodes(pb.ListNodesRequest(pool_id="p1"))
    assert [n.node_id for n in listed.nodes] == ["n1"]
    listed = await stub.ListNodes(
        pb.ListNodesRequest(lang_pair=pb.LanguagePair(src="en", tgt="fr"))
    )
    assert [n.node_id for n in listed.nodes] == ["n2"]
    listed = await stub.ListNodes(pb.ListNodesRequest(labels={"zone": "b"}))
    assert listed.nodes == []
    everything = await stub.ListNodes(pb.ListNodesRequest())
    assert [n.node_id for n in everything.nodes] == ["n1", "n2"]


async def test_register_is_idempotent(
    stub: Stub, shared_redis: RedisProcess, namespace: str
) -> None:
    first = await register(stub)
    before = dump(shared_redis.client(), namespace)
    again = await register(stub)
    assert again.version == first.version, "an identical registration is not a change"
    after = dump(shared_redis.client(), namespace)
    changed = {k for k in before if before[k] != after[k]}
    # Only liveness moves: the deadline and the heartbeat time.
    assert changed <= {f"{{{namespace}}}:expiry".encode(), f"{{{namespace}}}:node:n1".encode()}
    assert (await stub.GetStatus(pb.GetStatusRequest())).version == 1

    changed_node = await register(stub, capacity=5)
    assert changed_node.version == 2 and changed_node.capacity == 5


async def test_get_unknown_node_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetNode(pb.GetNodeRequest(node_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


BAD_REQUESTS: list[tuple[str, str, object, str]] = [
    ("RegisterNode", "empty id", pb.RegisterNodeRequest(node=make_node("")), "node.node_id"),
    ("RegisterNode", "space", pb.RegisterNodeRequest(node=make_node("a b")), "node.node_id"),
    ("RegisterNode", "brace", pb.RegisterNodeRequest(node=make_node("a{x}")), "node.node_id"),
    ("RegisterNode", "colon", pb.RegisterNodeRequest(node=make_node("a:b")), "node.node_id"),
    ("RegisterNode", "no node", pb.RegisterNodeRequest(), "node"),
    (
        "RegisterNode",
        "capacity",
        pb.RegisterNodeRequest(node=make_node(capacity=-1)),
        "node.capacity",
    ),
    (
        "RegisterNode",
        "pool id",
        pb.RegisterNodeRequest(node=make_node(pools=["ok", "b:d"])),
        "node.pools[1]",
    ),
    (
        "RegisterNode",
        "lang",
        pb.RegisterNodeRequest(node=make_node(lang_pairs=[pb.LanguagePair(src="e n", tgt="de")])),
        "node.lang_pairs[0].src",
    ),
    (
        "RegisterNode",
        "label size",
        pb.RegisterNodeRequest(node=make_node(labels={"k": "v" * 1000})),
        "node.labels",
    ),
    (
        "RegisterNode",
        "label count",
        pb.RegisterNodeRequest(node=make_node(labels={f"k{i}": "v" for i in range(100)})),
        "node.labels",
    ),
    ("RegisterNode", "ttl", pb.RegisterNodeRequest(node=make_node(), ttl_ms=5), "ttl_ms"),
    ("DeregisterNode", "id", pb.DeregisterNodeRequest(node_id="a}"), "node_id"),
    ("DrainNode", "id", pb.DrainNodeRequest(node_id=""), "node_id"),
    ("GetNode", "id", pb.GetNodeRequest(node_id="x" * 129), "node_id"),
    ("ListNodes", "status", pb.ListNodesRequest(status=42), "status"),  # type: ignore[arg-type]
    (
        "ListNodes",
        "half pair",
        pb.ListNodesRequest(lang_pair=pb.LanguagePair(src="en")),
        "lang_pair",
    ),
    ("SelectNodes", "count", pb.SelectNodesRequest(count=-3), "count"),
    ("SelectNodes", "min_health", pb.SelectNodesRequest(min_health=1.5), "min_health"),
    ("SelectNodes", "exclude", pb.SelectNodesRequest(exclude_node_ids=["a b"]), "exclude_node_ids"),
    ("ReserveSlot", "job id", pb.ReserveSlotRequest(node_id="n1", job_id="j{1}"), "job_id"),
    ("ReserveSlot", "empty job", pb.ReserveSlotRequest(node_id="n1", job_id=""), "job_id"),
    (
        "ReserveSlot",
        "lease",
        pb.ReserveSlotRequest(node_id="n1", job_id="j", lease_ms=-1),
        "lease_ms",
    ),
    ("ReleaseSlot", "job id", pb.ReleaseSlotRequest(node_id="n1", job_id="a:b"), "job_id"),
    ("Watch", "token", pb.WatchRequest(resume_token="garbage"), "resume_token"),
    ("Watch", "pool", pb.WatchRequest(pool_id="p p"), "pool_id"),
]


@pytest.mark.parametrize(
    ("method", "case", "request_msg", "field"),
    BAD_REQUESTS,
    ids=[f"{m}-{c}" for m, c, _, _ in BAD_REQUESTS],
)
async def test_bad_input_names_the_field_and_changes_nothing(
    stub: Stub,
    shared_redis: RedisProcess,
    namespace: str,
    method: str,
    case: str,
    request_msg: object,
    field: str,
) -> None:
    await register(stub)
    before = dump(shared_redis.client(), namespace)
    call = getattr(stub, method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method == "Watch":
            async for _ in call(request_msg):
                pass
        else:
            await call(request_msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field), err.value.details()
    assert dump(shared_redis.client(), namespace) == before


async def heartbeats(stub: Stub, requests: list[pb.HeartbeatRequest]) -> list[pb.HeartbeatResponse]:
    async def gen() -> AsyncIterator[pb.HeartbeatRequest]:
        for r in requests:
            yield r

    return [r async for r in stub.Heartbeat(gen())]


async def test_heartbeat_acks_in_order_and_logs_only_material_changes(stub: Stub) -> None:
    node = await register(stub)
    reqs = [
        pb.HeartbeatRequest(node_id="n1", seq=10, metrics=pb.NodeMetrics(cpu=0.5)),
        pb.HeartbeatRequest(node_id="n1", seq=11, metrics=pb.NodeMetrics(cpu=0.51)),
        pb.HeartbeatRequest(node_id="n1", seq=12, metrics=pb.NodeMetrics(cpu=0.52)),
        pb.HeartbeatRequest(node_id="n1", seq=13, metrics=pb.NodeMetrics(cpu=0.9, mem=0.2)),
        pb.HeartbeatRequest(node_id="ghost", seq=14),
    ]
    replies = await heartbeats(stub, reqs)
    assert [r.seq for r in replies] == [10, 11, 12, 13, 14]
    assert [r.action for r in replies] == [pb.HEARTBEAT_ACTION_CONTINUE] * 4 + [
        pb.HEARTBEAT_ACTION_REGISTER
    ]
    # 0.5 is material; 0.51 and 0.52 are within epsilon of it; 0.9 is material.
    assert [r.version for r in replies[:4]] == [node.version + 1] * 3 + [node.version + 2]
    assert all(r.deadline_ms > 0 and r.interval_ms > 0 for r in replies[:4])
    await eventually(lambda: True)
    got = (await stub.GetNode(pb.GetNodeRequest(node_id="n1"))).node
    assert got.metrics.cpu == pytest.approx(0.9) and got.metrics.mem == pytest.approx(0.2)
    assert 0 < got.health_score < 1


async def test_heartbeat_bad_metrics_end_the_stream(stub: Stub) -> None:
    await register(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await heartbeats(
            stub, [pb.HeartbeatRequest(node_id="n1", seq=1, metrics=pb.NodeMetrics(gpu=1.5))]
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("metrics.gpu")


async def test_cancelled_heartbeat_stream_leaves_nothing_behind(
    stub: Stub, sidecar: Sidecar
) -> None:
    await register(stub)
    call = stub.Heartbeat()
    await call.write(pb.HeartbeatRequest(node_id="n1", seq=1))
    assert (await call.read()).seq == 1
    assert sidecar.servicer is not None
    assert sidecar.servicer.heartbeat_streams == 1
    call.cancel()
    await eventually(
        lambda: sidecar.servicer is not None and sidecar.servicer.heartbeat_streams == 0
    )
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "heartbeat-reader" not in names


async def test_expiry_marks_offline_then_removes_and_register_revives(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, offline_grace_ms=600, min_ttl_ms=100)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, ttl_ms=300)
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
        await eventually(
            lambda: (n := sc.replica.get("n1")) is not None and n.status.value == "OFFLINE"
        )
        node = sc.replica.get("n1")
        assert node is not None and node.running_jobs == 0, "expiry frees reservations"
        replies = await heartbeats(stub, [pb.HeartbeatRequest(node_id="n1", seq=1)])
        assert replies[0].action == pb.HEARTBEAT_ACTION_REGISTER
        assert replies[0].status == pb.NODE_STATUS_OFFLINE
        await eventually(lambda: sc.replica.get("n1") is None)
        assert shared_redis.client().exists(f"{{{namespace}}}:node:n1") == 0
        revived = await register(stub, ttl_ms=300)
        assert revived.status == pb.NODE_STATUS_ONLINE


async def test_reregistering_an_offline_node_brings_it_online(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, min_ttl_ms=100)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, ttl_ms=200)
        await eventually(
            lambda: (n := sc.replica.get("n1")) is not None and n.status.value == "OFFLINE"
        )
        node = await register(stub, ttl_ms=200)
        assert node.status == pb.NODE_STATUS_ONLINE


async def test_slots_are_exact_and_idempotent(stub: Stub) -> None:
    await register(stub, capacity=2)
    first = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
    assert first.created and first.node.running_jobs == 1 and first.lease_deadline_ms > 0
    retry = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
    assert not retry.created and retry.node.running_jobs == 1
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j2"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j3"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    released = await stub.ReleaseSlot(pb.ReleaseSlotRequest(node_id="n1", job_id="j1"))
    assert released.released and released.node.running_jobs == 1
    again = await stub.ReleaseSlot(pb.ReleaseSlotRequest(node_id="n1", job_id="j1"))
    assert not again.released and again.node.running_jobs == 1
    unknown = await stub.ReleaseSlot(pb.ReleaseSlotRequest(node_id="n1", job_id="never"))
    assert not unknown.released
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="ghost", job_id="j"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_drain_blocks_new_slots_but_keeps_running_ones(stub: Stub) -> None:
    await register(stub, capacity=3)
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
    drained = await stub.DrainNode(pb.DrainNodeRequest(node_id="n1"))
    assert drained.node.status == pb.NODE_STATUS_DRAINING
    assert (await stub.DrainNode(pb.DrainNodeRequest(node_id="n1"))).node.version == (
        drained.node.version
    ), "draining twice changes nothing"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j2"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    renewed = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
    assert not renewed.created, "a running job may renew its lease on a draining node"
    # A restart of the node must not undo an operator's drain.
    assert (await register(stub, capacity=3)).status == pb.NODE_STATUS_DRAINING
    selected = await stub.SelectNodes(pb.SelectNodesRequest())
    assert selected.nodes == [] and selected.breakdown.draining == 1
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.DrainNode(pb.DrainNodeRequest(node_id="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_lease_expiry_frees_the_slot(stub: Stub, sidecar: Sidecar) -> None:
    await register(stub, capacity=1)
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1", lease_ms=150))
    await eventually(lambda: (n := sidecar.replica.get("n1")) is not None and n.running_jobs == 0)
    again = await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j2"))
    assert again.created


async def test_deregister_is_idempotent_and_frees_slots(
    stub: Stub, shared_redis: RedisProcess, namespace: str
) -> None:
    await register(stub)
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
    first = await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1"))
    assert first.existed
    second = await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1"))
    assert not second.existed and second.version == first.version
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetNode(pb.GetNodeRequest(node_id="n1"))
    client = shared_redis.client()
    left = {k.decode() for k in client.scan_iter(match="{" + namespace + "}:*")}
    assert left == {f"{{{namespace}}}:{k}" for k in ("ver", "log", "epoch")}


async def test_select_filters_ranks_and_explains(stub: Stub) -> None:
    await register(stub, "healthy", capacity=4)
    await register(stub, "busy", capacity=4)
    await register(stub, "other-pool", pools=["p9"])
    await register(stub, "no-service", services=[])
    await register(stub, "wrong-zone", labels={"zone": "b"})
    await register(stub, "full", capacity=1)
    await register(stub, "excluded")
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="full", job_id="j"))
    await heartbeats(
        stub,
        [pb.HeartbeatRequest(node_id="busy", seq=1, metrics=pb.NodeMetrics(cpu=0.9, load=0.9))],
    )
    await asyncio.sleep(0.05)
    reply = await stub.SelectNodes(
        pb.SelectNodesRequest(
            pool_id="p1",
            lang_pair=pb.LanguagePair(src="en", tgt="de"),
            required_services=["mt"],
            labels={"zone": "a"},
            count=5,
            exclude_node_ids=["excluded"],
        )
    )
    assert sorted(n.node_id for n in reply.nodes) == ["busy", "healthy"]
    b = reply.breakdown
    assert (
        b.considered,
        b.wrong_pool,
        b.excluded_id,
        b.missing_service,
        b.labels,
        b.full,
        b.eligible,
    ) == (7, 1, 1, 1, 1, 1, 2)
    low = await stub.SelectNodes(
        pb.SelectNodesRequest(pool_id="p1", min_health=0.8, count=5, exclude_node_ids=["excluded"])
    )
    assert "busy" not in [n.node_id for n in low.nodes] and low.breakdown.low_health == 1


async def test_two_sidecars_share_one_registry(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    a = await sidecar_factory(shared_redis.url, namespace)
    b = await sidecar_factory(shared_redis.url, namespace)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sa, sb = Stub(ca), Stub(cb)
        watch = sb.Watch(pb.WatchRequest())
        first = await watch.read()
        assert first.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END
        await register(sa, "n1")
        event = await asyncio.wait_for(watch.read(), 2)
        assert event.type == pb.WATCH_EVENT_TYPE_PUT and event.node.node_id == "n1"
        listed = await sb.ListNodes(pb.ListNodesRequest())
        assert [n.node_id for n in listed.nodes] == ["n1"]
        await sb.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j1"))
        await eventually(lambda: (n := a.replica.get("n1")) is not None and n.running_jobs == 1)
        await sa.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1"))
        while (event := await asyncio.wait_for(watch.read(), 2)).type != (
            pb.WATCH_EVENT_TYPE_DELETE
        ):
            pass
        assert event.node_id == "n1"
        watch.cancel()


async def test_health_and_reflection(sidecar: Sidecar) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "registry.v1.RegistryService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in refl.ServerReflectionInfo(ask())]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "registry.v1.RegistryService" in names


async def test_status_reports_the_replica(stub: Stub, namespace: str) -> None:
    await register(stub)
    status = await stub.GetStatus(pb.GetStatusRequest())
    assert status.mode == "NORMAL" and status.ready
    assert status.node_count == 1 and status.version == 1 and status.namespace == namespace
    assert status.epoch and status.redis_latency_p99_us > 0


async def test_writes_to_a_frozen_redis_are_buffered_then_replayed(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    """A frozen Redis sends no reset; the hot path's own timeout finds it, the write is
    acknowledged from the buffer, and it reaches Redis once Redis is back. Slots cannot
    be promised meanwhile."""
    sc = await sidecar_factory(redis_proc.url, namespace, watchdog_timeout_ms=25)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub)
        redis_proc.pause()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            drained = await stub.DrainNode(pb.DrainNodeRequest(node_id="n1"), timeout=5)
            elapsed = loop.time() - started
            assert drained.node.status == pb.NODE_STATUS_DRAINING
            assert elapsed < 0.5, f"took {elapsed:.2f}s"
            status = await stub.GetStatus(pb.GetStatusRequest())
            assert status.mode != "NORMAL" and status.buffered_writes == 1
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="j"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry" in (err.value.details() or "")
            got = await stub.GetNode(pb.GetNodeRequest(node_id="n1"), timeout=1)
            assert got.node.node_id == "n1" and got.freshness.degraded
        finally:
            redis_proc.resume()
        await eventually(lambda: sc.degradation.settled, timeout=5)
        assert redis_proc.client().hget(f"{{{namespace}}}:node:n1", "status") == b"DRAINING"
        await eventually(
            lambda: (n := sc.replica.get("n1")) is not None and n.status.value == "DRAINING"
        )


async def test_shutdown_ends_open_streams_without_waiting_out_the_grace(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, shutdown_grace_s=5.0)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub)
        beats = stub.Heartbeat()
        await beats.write(pb.HeartbeatRequest(node_id="n1", seq=1))
        assert (await beats.read()).seq == 1
        watch = stub.Watch(pb.WatchRequest())
        assert (await watch.read()).type == pb.WATCH_EVENT_TYPE_SNAPSHOT
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sc.aclose()
        assert loop.time() - started < 2.0, "open streams must not hold shutdown for the grace"
        for call in (beats, watch):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_full_write_buffer_refuses_instead_of_dropping(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(
        redis_proc.url, namespace, watchdog_timeout_ms=25, write_buffer_max=2
    )
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        for node_id in ("a", "b", "c"):
            await register(stub, node_id)
        redis_proc.pause()
        try:
            await eventually(lambda: sc.degradation.degraded, timeout=1)
            for node_id in ("a", "b"):
                await stub.DrainNode(pb.DrainNodeRequest(node_id=node_id), timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.DrainNode(pb.DrainNodeRequest(node_id="c"), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "buffer is full" in (err.value.details() or "")
        finally:
            redis_proc.resume()
        await eventually(lambda: sc.degradation.settled, timeout=5)
        client = redis_proc.client()
        statuses = [client.hget(f"{{{namespace}}}:node:{n}", "status") for n in "abc"]
        assert statuses == [b"DRAINING", b"DRAINING", b"ONLINE"]


async def test_metrics_given_at_registration_are_kept_until_the_first_heartbeat(
    stub: Stub,
) -> None:
    """A node registered busy is ranked as busy before its first heartbeat."""
    node = await register(stub, "busy", metrics=pb.NodeMetrics(cpu=0.95, mem=0.5))
    assert node.metrics.cpu == pytest.approx(0.95) and node.metrics.mem == pytest.approx(0.5)
    assert node.health_score == pytest.approx(health_score(Metrics(cpu=0.95, mem=0.5)))
    got = await stub.GetNode(pb.GetNodeRequest(node_id="busy"))
    assert got.node.metrics.cpu == pytest.approx(0.95)
    idle = await register(stub, "idle")  # no metrics given: nothing assumed
    assert idle.metrics.cpu == 0 and idle.health_score == 1.0
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await register(stub, "bad", metrics=pb.NodeMetrics(cpu=1.5))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node.metrics" in (bad.value.details() or "")
