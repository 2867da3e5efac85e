"""Scheduling quality over real gRPC and a real Redis: pools, Schedule, exact slots under
races and retries, reconciliation, health, and selection that spreads load."""

from __future__ import annotations

import asyncio
import collections
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.config import Settings
from registry.health import health_score
from registry.model import Metrics
from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import TEST_SETTINGS, SidecarFactory
from tests.integration.test_sidecar import dump, eventually, heartbeats, register
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub


def metrics(x: float) -> pb.NodeMetrics:
    return pb.NodeMetrics(cpu=x, gpu=x, mem=x, load=x, error_rate=x)


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


# --- pools ----------------------------------------------------------------------------


async def test_pools_are_stored_versioned_and_replicated(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    a = await sidecar_factory(shared_redis.url, namespace)
    b = await sidecar_factory(shared_redis.url, namespace)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        sa, sb = Stub(ca), Stub(cb)
        pool = pb.Pool(
            pool_id="mt",
            lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
            required_services=["mt"],
            labels={"zone": "a"},
            min_health=0.2,
            weights=pb.SelectionWeights(cpu=1, free_capacity=0.5),
        )
        stored = (await sa.PutPool(pb.PutPoolRequest(pool=pool))).pool
        assert stored.version > 0 and stored.weights.cpu == 1
        again = (await sa.PutPool(pb.PutPoolRequest(pool=pool))).pool
        assert again.version == stored.version, "an identical PutPool changes nothing"
        assert (await sa.GetPool(pb.GetPoolRequest(pool_id="mt"))).pool == stored
        await eventually(lambda: "mt" in b.replica.pools)
        assert [p.pool_id for p in (await sb.ListPools(pb.ListPoolsRequest())).pools] == ["mt"]
        assert (await sb.GetPool(pb.GetPoolRequest(pool_id="mt"))).pool == stored
        assert await code_of(sb.GetPool(pb.GetPoolRequest(pool_id="nope"))) == (
            grpc.StatusCode.NOT_FOUND
        )
        # A restarted sidecar preloads pools with the nodes.
        c = await sidecar_factory(shared_redis.url, namespace)
        assert c.replica.pools["mt"].version == stored.version
        status = await sb.GetStatus(pb.GetStatusRequest())
        assert status.pool_count == 1


BAD_POOLS: list[tuple[pb.PutPoolRequest, str]] = [
    (pb.PutPoolRequest(), "pool"),
    (pb.PutPoolRequest(pool=pb.Pool(pool_id="a{b}")), "pool.pool_id"),
    (pb.PutPoolRequest(pool=pb.Pool(pool_id="p", min_health=2)), "pool.min_health"),
    (
        pb.PutPoolRequest(pool=pb.Pool(pool_id="p", weights=pb.SelectionWeights(cpu=-1))),
        "pool.weights.cpu",
    ),
    (
        pb.PutPoolRequest(pool=pb.Pool(pool_id="p", weights=pb.SelectionWeights(free_capacity=99))),
        "pool.weights.free_capacity",
    ),
    (
        pb.PutPoolRequest(
            pool=pb.Pool(pool_id="p", lang_pairs=[pb.LanguagePair(src="e n", tgt="de")])
        ),
        "pool.lang_pairs[0].src",
    ),
    (
        pb.PutPoolRequest(pool=pb.Pool(pool_id="p", required_services=[""])),
        "pool.required_services[0]",
    ),
]


@pytest.mark.parametrize(("request_msg", "field"), BAD_POOLS, ids=[f for _, f in BAD_POOLS])
async def test_bad_pools_name_the_field_and_change_nothing(
    stub: Stub,
    shared_redis: RedisProcess,
    namespace: str,
    request_msg: pb.PutPoolRequest,
    field: str,
) -> None:
    await register(stub)
    before = dump(shared_redis.client(), namespace)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PutPool(request_msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field), err.value.details()
    assert dump(shared_redis.client(), namespace) == before


async def test_a_pool_adds_its_requirements_to_selection(stub: Stub) -> None:
    """Members are the nodes declaring the pool; the pool's language pairs, services,
    labels and min_health apply to them as if the request had asked for them."""
    await register(stub, "ok")
    await register(stub, "fr-only", lang_pairs=[pb.LanguagePair(src="en", tgt="fr")])
    await register(stub, "no-mt", services=[pb.InstalledService(name="ocr")])
    await register(stub, "zone-b", labels={"zone": "b"})
    await register(stub, "sick")
    await heartbeats(stub, [pb.HeartbeatRequest(node_id="sick", seq=1, metrics=metrics(0.9))])
    await register(stub, "outsider", pools=["other"])
    await stub.PutPool(
        pb.PutPoolRequest(
            pool=pb.Pool(
                pool_id="p1",
                lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
                required_services=["mt"],
                labels={"zone": "a"},
                min_health=0.5,
            )
        )
    )
    await asyncio.sleep(0.05)
    reply = await stub.SelectNodes(pb.SelectNodesRequest(pool_id="p1", count=10))
    assert [n.node_id for n in reply.nodes] == ["ok"]
    b = reply.breakdown
    assert (
        b.considered,
        b.wrong_pool,
        b.wrong_lang_pair,
        b.missing_service,
        b.labels,
        b.low_health,
        b.eligible,
    ) == (6, 1, 1, 1, 1, 1, 1)
    # A request for a pair the pool does not serve finds nothing, and says why.
    off = await stub.SelectNodes(
        pb.SelectNodesRequest(pool_id="p1", lang_pair=pb.LanguagePair(src="en", tgt="fr"))
    )
    assert off.nodes == [] and off.breakdown.wrong_lang_pair == 5
    # The request's labels win over the pool's on the same key.
    b_zone = await stub.SelectNodes(pb.SelectNodesRequest(pool_id="p1", labels={"zone": "b"}))
    assert [n.node_id for n in b_zone.nodes] == ["zone-b"]
    assert await code_of(stub.SelectNodes(pb.SelectNodesRequest(pool_id="ghost"))) == (
        grpc.StatusCode.NOT_FOUND
    )
    # A pool no one configured but nodes declare is usable with no extra requirements.
    other = await stub.SelectNodes(pb.SelectNodesRequest(pool_id="other"))
    assert [n.node_id for n in other.nodes] == ["outsider"]


# --- Schedule -------------------------------------------------------------------------


async def test_schedule_reserves_and_is_idempotent_by_job(stub: Stub) -> None:
    await register(stub, "a", capacity=1)
    await register(stub, "b", capacity=1)
    first = await stub.Schedule(
        pb.ScheduleRequest(
            selector=pb.SelectNodesRequest(pool_id="p1"), job_id="job-1", lease_ms=60_000
        )
    )
    assert first.created and first.attempts == 1 and first.node.running_jobs == 1
    assert first.lease_deadline_ms > 0 and first.breakdown.eligible == 2
    # Retried (say, the reply was lost): the same node, no second slot, lease renewed.
    again = await stub.Schedule(
        pb.ScheduleRequest(
            selector=pb.SelectNodesRequest(pool_id="p1"), job_id="job-1", lease_ms=60_000
        )
    )
    assert again.node.node_id == first.node.node_id and not again.created
    assert again.lease_deadline_ms >= first.lease_deadline_ms
    other = "b" if first.node.node_id == "a" else "a"
    second = await stub.Schedule(
        pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="job-2")
    )
    assert second.node.node_id == other
    # Both full now: a retry of job-1 still finds its slot.
    retry = await stub.Schedule(
        pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="job-1")
    )
    assert retry.node.node_id == first.node.node_id and not retry.created
    # A new job gets RESOURCE_EXHAUSTED with the breakdown as a status detail.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Schedule(
            pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="job-3")
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    assert status is not None
    breakdown = pb.SelectionBreakdown()
    assert status.details[0].Unpack(breakdown)
    assert (breakdown.considered, breakdown.full, breakdown.eligible) == (2, 2, 0)
    # ReserveSlot of a job that holds a slot elsewhere says where.
    with pytest.raises(grpc.aio.AioRpcError) as held:
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id=other, job_id="job-1"))
    assert held.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.node.node_id in (held.value.details() or "")


BAD_SCHEDULES: list[tuple[pb.ScheduleRequest, str]] = [
    (pb.ScheduleRequest(job_id=""), "job_id"),
    (pb.ScheduleRequest(job_id="j{1}"), "job_id"),
    (pb.ScheduleRequest(job_id="j", lease_ms=-5), "lease_ms"),
    (
        pb.ScheduleRequest(job_id="j", selector=pb.SelectNodesRequest(pool_id="a:b")),
        "selector.pool_id",
    ),
    (pb.ScheduleRequest(job_id="j", selector=pb.SelectNodesRequest(count=-1)), "selector.count"),
]


@pytest.mark.parametrize(
    ("request_msg", "field"),
    BAD_SCHEDULES,
    ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_SCHEDULES)],
)
async def test_bad_schedules_name_the_field_and_change_nothing(
    stub: Stub,
    shared_redis: RedisProcess,
    namespace: str,
    request_msg: pb.ScheduleRequest,
    field: str,
) -> None:
    await register(stub)
    before = dump(shared_redis.client(), namespace)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Schedule(request_msg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field), err.value.details()
    assert dump(shared_redis.client(), namespace) == before


async def test_schedule_in_an_unknown_pool_is_not_found(stub: Stub) -> None:
    await register(stub)
    assert await code_of(
        stub.Schedule(
            pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="ghost"), job_id="j")
        )
    ) == (grpc.StatusCode.NOT_FOUND)


async def test_racing_schedulers_fill_exactly_the_free_slots(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    """8 schedulers on 2 sidecars race for the last 3 slots: exactly 3 win."""
    a = await sidecar_factory(shared_redis.url, namespace)
    b = await sidecar_factory(shared_redis.url, namespace)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        stubs = [Stub(ca), Stub(cb)]
        await register(stubs[0], "n1", capacity=5)
        for job in ("old-1", "old-2"):
            await stubs[0].ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id=job))
        await eventually(lambda: (n := b.replica.get("n1")) is not None and n.running_jobs == 2)

        async def one(i: int) -> bool:
            try:
                await stubs[i % 2].Schedule(
                    pb.ScheduleRequest(
                        selector=pb.SelectNodesRequest(pool_id="p1"), job_id=f"race-{i}"
                    )
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            return True

        results = await asyncio.gather(*(one(i) for i in range(8)))
        assert sum(results) == 3
        client = shared_redis.client()
        assert client.hlen(f"{{{namespace}}}:jobs:n1") == 5
        assert int(client.hget(f"{{{namespace}}}:node:n1", "jobs")) == 5


# --- spreading ------------------------------------------------------------------------


async def _schedule_many(stubs: list[Stub], schedulers: int, jobs: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()

    async def scheduler(k: int) -> None:
        stub = stubs[k % len(stubs)]
        for j in range(jobs):
            reply = await stub.Schedule(
                pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id=f"s{k}-{j}")
            )
            counts[reply.node.node_id] += 1

    await asyncio.gather(*(scheduler(k) for k in range(schedulers)))
    return counts


async def _two_sidecar_stubs(
    sidecar_factory: SidecarFactory, url: str, namespace: str
) -> AsyncIterator[list[Stub]]:
    a = await sidecar_factory(url, namespace)
    b = await sidecar_factory(url, namespace)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        yield [Stub(ca), Stub(cb)]


@pytest.mark.slow
async def test_four_schedulers_spread_jobs_over_equal_nodes(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    async for stubs in _two_sidecar_stubs(sidecar_factory, shared_redis.url, namespace):
        for i in range(20):
            await register(stubs[0], f"n{i:02}", capacity=60)
        await asyncio.sleep(0.1)
        counts = await _schedule_many(stubs, schedulers=4, jobs=200)
        per_node = [counts[f"n{i:02}"] for i in range(20)]
        print(
            f"\n4 x 200 jobs on 20 equal nodes: min {min(per_node)}, max {max(per_node)}, "
            f"mean {sum(per_node) / 20:.0f}: {per_node}"
        )
        assert sum(per_node) == 800
        # Expected 40 each; weighting by free slots pulls stragglers back towards it.
        assert min(per_node) >= 28 and max(per_node) <= 52, per_node


@pytest.mark.slow
async def test_healthier_nodes_get_proportionally_more_jobs(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    async for stubs in _two_sidecar_stubs(sidecar_factory, shared_redis.url, namespace):
        # health = 1 - 0.9 x with every reported metric at x (no heartbeat delay):
        # x = 1/9 -> 0.9, x = 0.55/0.9 -> 0.45: twice as healthy.
        beats = []
        for i in range(20):
            await register(stubs[0], f"n{i:02}", capacity=10_000)
            x = 1 / 9 if i < 10 else 0.55 / 0.9
            beats.append(pb.HeartbeatRequest(node_id=f"n{i:02}", seq=i, metrics=metrics(x)))
        await heartbeats(stubs[0], beats)
        await asyncio.sleep(0.1)
        counts = await _schedule_many(stubs, schedulers=4, jobs=300)
        healthy = sum(counts[f"n{i:02}"] for i in range(10))
        weak = sum(counts[f"n{i:02}"] for i in range(10, 20))
        print(f"\nhealth 0.9 vs 0.45: {healthy} vs {weak} jobs (ratio {healthy / weak:.2f})")
        assert healthy + weak == 1200
        # Expected 2.0 (800 vs 400, sd 16 jobs): these bounds are about 3.7 sd out.
        assert 1.6 <= healthy / weak <= 2.5


# --- leases, reconciliation, health ---------------------------------------------------


async def test_heartbeat_reconciles_slots_with_the_node(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, reconcile_grace_ms=300)
    client = shared_redis.client()
    leases = f"{{{namespace}}}:leases"
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, capacity=3)
        for job in ("runs", "lost"):
            await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id=job, lease_ms=60_000))
        before = client.zscore(leases, "n1/runs")
        # Within the grace period a missing job is kept: it may not have started yet.
        early = await heartbeats(
            stub,
            [pb.HeartbeatRequest(node_id="n1", seq=1, report_jobs=True, running_job_ids=["runs"])],
        )
        assert list(early[0].released_job_ids) == []
        await asyncio.sleep(0.35)
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="fresh"))
        late = await heartbeats(
            stub,
            [pb.HeartbeatRequest(node_id="n1", seq=2, report_jobs=True, running_job_ids=["runs"])],
        )
        assert list(late[0].released_job_ids) == ["lost"]
        assert client.zscore(leases, "n1/runs") > before, "a running job's lease is renewed"
        assert sorted(k.decode() for k in client.hkeys(f"{{{namespace}}}:jobs:n1")) == [
            "fresh",
            "runs",
        ]
        assert client.hget(f"{{{namespace}}}:jobnode", "lost") is None
        await eventually(lambda: (n := sc.replica.get("n1")) is not None and n.running_jobs == 2)
        # An empty report is a report: everything old enough goes.
        await asyncio.sleep(0.35)
        empty = await heartbeats(stub, [pb.HeartbeatRequest(node_id="n1", seq=3, report_jobs=True)])
        assert sorted(empty[0].released_job_ids) == ["fresh", "runs"]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await heartbeats(
                stub, [pb.HeartbeatRequest(node_id="n1", seq=4, running_job_ids=["x"])]
            )
        assert (err.value.details() or "").startswith("report_jobs")


async def test_late_heartbeats_lower_health_as_the_script_computes_it(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, min_ttl_ms=100)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, ttl_ms=300)  # interval 100 ms
        on_time = await heartbeats(
            stub, [pb.HeartbeatRequest(node_id="n1", seq=1, metrics=metrics(0.3))]
        )
        assert on_time[0].interval_ms == 100
        node = (await stub.GetNode(pb.GetNodeRequest(node_id="n1"))).node
        assert node.metrics.heartbeat_delay == 0
        expected = health_score(Metrics(0.3, 0.3, 0.3, 0.3, 0.3, 0.0))
        assert node.health_score == pytest.approx(expected, abs=1e-4)
        await asyncio.sleep(0.25)  # 150 ms late: delay capped at 1
        await heartbeats(stub, [pb.HeartbeatRequest(node_id="n1", seq=2, metrics=metrics(0.3))])
        await eventually(
            lambda: (n := sc.replica.get("n1")) is not None and n.metrics.heartbeat_delay > 0
        )
        late = sc.replica.get("n1")
        assert late is not None and late.metrics.heartbeat_delay == 1.0
        assert late.health_score == pytest.approx(
            health_score(Metrics(0.3, 0.3, 0.3, 0.3, 0.3, 1.0)), abs=1e-4
        )
        assert late.health_score < node.health_score


# --- the slot invariants under random interleavings, across 3 sidecars ----------------

NODES = {"n1": 2, "n2": 3}
JOBS = [f"j{i}" for i in range(5)]

op = st.one_of(
    st.tuples(
        st.just("reserve"), st.sampled_from(sorted(NODES)), st.sampled_from(JOBS), st.integers(0, 2)
    ),
    st.tuples(
        st.just("release"), st.sampled_from(sorted(NODES)), st.sampled_from(JOBS), st.integers(0, 2)
    ),
    st.tuples(st.just("schedule"), st.just(""), st.sampled_from(JOBS), st.integers(0, 2)),
    st.tuples(
        st.just("short_lease"),
        st.sampled_from(sorted(NODES)),
        st.sampled_from(JOBS),
        st.integers(0, 2),
    ),
    st.tuples(st.just("expire"), st.just(""), st.just(""), st.integers(0, 2)),
    st.tuples(
        st.just("reconcile"),
        st.sampled_from(sorted(NODES)),
        st.sampled_from(["", "j0", "j0,j1", "j2,j3,j4"]),
        st.integers(0, 2),
    ),
    st.tuples(
        st.just("deregister"), st.sampled_from(sorted(NODES)), st.just(""), st.integers(0, 2)
    ),
    st.tuples(st.just("retry"), st.just(""), st.just(""), st.integers(0, 2)),
)


def check_invariants(client: redis.Redis, ns: str) -> dict[str, int]:
    """0 <= running_jobs <= capacity, running_jobs = live reservations, and the job map
    agrees with every node's jobs hash."""
    counts: dict[str, int] = {}
    jobnode = {k.decode(): v.decode() for k, v in client.hgetall(f"{{{ns}}}:jobnode").items()}
    held: dict[str, str] = {}
    for node_id, capacity in NODES.items():
        jobs = [j.decode() for j in client.hkeys(f"{{{ns}}}:jobs:{node_id}")]
        for job in jobs:
            assert job not in held, f"{job} holds two slots"
            held[job] = node_id
        raw = client.hget(f"{{{ns}}}:node:{node_id}", "jobs")
        if raw is None:
            assert jobs == [], f"{node_id} is gone but holds {jobs}"
            continue
        running = int(raw)
        assert running == len(jobs) and 0 <= running <= capacity
        counts[node_id] = running
    assert jobnode == held
    return counts


async def _run_ops(url: str, ops: list[tuple[str, str, str, int]]) -> None:
    ns = "h" + secrets.token_hex(4)
    client = redis.Redis.from_url(url)
    sidecars = []
    try:
        for _ in range(3):
            sc = Sidecar(
                Settings(
                    **{
                        **TEST_SETTINGS.__dict__,
                        "redis_url": url,
                        "namespace": ns,
                        "reconcile_grace_ms": 0,
                        "data_dir": Path(tempfile.mkdtemp(prefix="registry-test-")),
                    }
                )
            )
            await sc.start()
            sidecars.append(sc)
        gateways = [sc.gateway for sc in sidecars]
        channels = [grpc.aio.insecure_channel(sc.address) for sc in sidecars]
        stubs = [Stub(c) for c in channels]
        for node_id, capacity in NODES.items():
            await register(stubs[0], node_id, capacity=capacity)
        last: tuple[str, str, str, int] | None = None
        for step in ops:
            kind, node_id, arg, who = step
            if kind == "retry":
                if last is None:
                    continue
                kind, node_id, arg, who = last
            stub = stubs[who]
            try:
                if kind == "reserve":
                    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id=node_id, job_id=arg))
                elif kind == "short_lease":
                    await stub.ReserveSlot(
                        pb.ReserveSlotRequest(node_id=node_id, job_id=arg, lease_ms=1)
                    )
                elif kind == "release":
                    await stub.ReleaseSlot(pb.ReleaseSlotRequest(node_id=node_id, job_id=arg))
                elif kind == "schedule":
                    await stub.Schedule(pb.ScheduleRequest(job_id=arg))
                elif kind == "expire":
                    await asyncio.sleep(0.005)
                    await gateways[who].expire(60_000)
                elif kind == "reconcile":
                    await heartbeats(
                        stub,
                        [
                            pb.HeartbeatRequest(
                                node_id=node_id,
                                seq=1,
                                report_jobs=True,
                                running_job_ids=[j for j in arg.split(",") if j],
                            )
                        ],
                    )
                elif kind == "deregister":
                    await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id=node_id))
                    await register(stub, node_id, capacity=NODES[node_id])
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.ALREADY_EXISTS,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ), exc
            last = step if step[0] != "retry" else last
            check_invariants(client, ns)
        # Settled: every replica holds what Redis holds.
        counts = check_invariants(client, ns)
        version = int(client.get(f"{{{ns}}}:ver") or 0)
        for sc in sidecars:
            for _ in range(200):
                if sc.replica.version >= version:
                    break
                await asyncio.sleep(0.01)
            assert sc.replica.version == version
            for node_id, running in counts.items():
                node = sc.replica.get(node_id)
                assert node is not None and node.running_jobs == running
        for c in channels:
            await c.close()
    finally:
        for sc in sidecars:
            await sc.aclose()
        for key in client.scan_iter(match="{" + ns + "}:*"):
            client.delete(key)
        client.close()


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_slot_invariants_hold_under_any_interleaving(
    shared_redis: RedisProcess, ops: list[tuple[str, str, str, int]]
) -> None:
    asyncio.run(_run_ops(shared_redis.url, ops))


async def test_slots_come_back_from_job_reports_after_redis_lost_its_data(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    """Job ids live only in Redis. After Redis restarts empty, the sidecar registers the
    nodes whose streams it holds again, opening an adoption window: a heartbeat that
    reports jobs then re-creates their reservations, up to capacity, never for a job
    that holds a slot elsewhere. Outside that window reported jobs are ignored."""
    sc = await sidecar_factory(redis_proc.url, namespace, reconcile_grace_ms=60_000)
    client = redis_proc.client()
    jobs = f"{{{namespace}}}:jobs:n1"
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, capacity=2)
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n1", job_id="a"))
        beats = stub.Heartbeat()

        async def beat(seq: int, *running: str) -> pb.HeartbeatResponse:
            request = pb.HeartbeatRequest(
                node_id="n1", seq=seq, report_jobs=True, running_job_ids=list(running)
            )
            await beats.write(request)
            reply: pb.HeartbeatResponse = await beats.read()
            return reply

        await beat(1, "a", "stray")
        assert sorted(k.decode() for k in client.hkeys(jobs)) == ["a"], "no adoption outside"

        redis_proc.restart(keep_data=False)  # empty: the slot of "a" is gone
        await eventually(lambda: sc.degradation.rebuilds == 1, timeout=10)
        await eventually(lambda: sc.degradation.settled, timeout=10)
        client = redis_proc.client()
        assert client.hlen(jobs) == 0
        client.hset(f"{{{namespace}}}:jobnode", "elsewhere", "n9")  # held on another node

        reply = await beat(2, "a", "elsewhere", "b", "c")
        assert reply.action == pb.HEARTBEAT_ACTION_CONTINUE
        assert sorted(k.decode() for k in client.hkeys(jobs)) == ["a", "b"], "up to capacity"
        assert client.hget(f"{{{namespace}}}:jobnode", "a") == b"n1"
        assert client.hget(f"{{{namespace}}}:jobnode", "elsewhere") == b"n9"
        assert client.hget(f"{{{namespace}}}:node:n1", "jobs") == b"2"
        assert client.zscore(f"{{{namespace}}}:leases", "n1/a") is not None
        await eventually(lambda: (n := sc.replica.get("n1")) is not None and n.running_jobs == 2)
        await beats.done_writing()
