"""Watch over real gRPC: snapshot, live events, resume, bookmarks, slow watchers."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import eventually, make_node
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub
Event = tuple[int, str, int]


def key(e: pb.WatchEvent) -> Event:
    return (e.type, e.node_id, e.version)


async def read_until(call: object, predicate: object, timeout: float = 3.0) -> list[pb.WatchEvent]:
    out: list[pb.WatchEvent] = []
    while True:
        event = await asyncio.wait_for(call.read(), timeout)  # type: ignore[attr-defined]
        assert event is not grpc.aio.EOF
        out.append(event)
        if predicate(event):  # type: ignore[operator]
            return out


_capacities = itertools.count(1)


async def churn(stub: Stub, n: int, prefix: str = "n") -> None:
    """``n`` registrations that each change something (a capacity never used before)."""
    for i in range(n):
        await stub.RegisterNode(
            pb.RegisterNodeRequest(node=make_node(f"{prefix}{i % 3}", capacity=next(_capacities)))
        )


async def test_resumed_watch_sees_exactly_what_a_continuous_one_saw(stub: Stub) -> None:
    continuous = stub.Watch(pb.WatchRequest())
    resumer = stub.Watch(pb.WatchRequest())
    for call in (continuous, resumer):
        assert (await call.read()).type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END
    await churn(stub, 6)
    first = await read_until(resumer, lambda e: e.version == 3)
    token = first[-1].resume_token
    resumer.cancel()
    await churn(stub, 6)
    await stub.DeregisterNode(pb.DeregisterNodeRequest(node_id="n1"))
    seen = await read_until(continuous, lambda e: e.type == pb.WATCH_EVENT_TYPE_DELETE)
    resumed = stub.Watch(pb.WatchRequest(resume_token=token))
    again = await read_until(resumed, lambda e: e.type == pb.WATCH_EVENT_TYPE_DELETE)
    expected = [key(e) for e in seen if e.version > 3]
    assert [key(e) for e in again] == expected
    assert [e.version for e in again] == list(range(4, 4 + len(again)))
    continuous.cancel()
    resumed.cancel()


async def test_token_older_than_history_resumes_from_the_log_then_snapshots(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    """Past the in-memory history the Redis log still serves a resume exactly; past the
    log, the watcher gets a snapshot that equals Redis."""
    sc = await sidecar_factory(shared_redis.url, namespace, watch_history=4)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await churn(stub, 2)
        call = stub.Watch(pb.WatchRequest())
        end = await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END)
        old_token = end[-1].resume_token
        seen = await read_until_version(call, churn(stub, 10), 12)
        call.cancel()
        await eventually(lambda: sc.replica.version == 12)
        assert sc.replica.history_after(2) is None, "history holds only the last 4 changes"
        resumed = stub.Watch(pb.WatchRequest(resume_token=old_token))
        replay = await read_until(resumed, lambda e: e.version == 12)
        assert [key(e) for e in replay] == [key(e) for e in seen]
        resumed.cancel()

        shared_redis.client().xtrim(f"{{{namespace}}}:log", maxlen=1, approximate=False)
        call = stub.Watch(pb.WatchRequest(resume_token=old_token))
        events = await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END)
        snapshot = {e.node.node_id: e.node for e in events[:-1]}
        assert all(e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT for e in events[:-1])
        listed = await stub.ListNodes(pb.ListNodesRequest())
        assert snapshot == {n.node_id: n for n in listed.nodes}
        client = shared_redis.client()
        for node_id, node in snapshot.items():
            stored = client.hgetall(f"{{{namespace}}}:node:{node_id}")
            assert int(stored[b"ver"]) == node.version
            assert int(stored[b"capacity"]) == node.capacity
        assert events[-1].version == 12
        # A token from another data set (another epoch) also gets a snapshot.
        foreign = stub.Watch(pb.WatchRequest(resume_token="0123456789abcdef:5"))
        first = await asyncio.wait_for(foreign.read(), 2)
        assert first.type == pb.WATCH_EVENT_TYPE_SNAPSHOT
        call.cancel()
        foreign.cancel()


async def read_until_version(call: object, work: object, version: int) -> list[pb.WatchEvent]:
    """Run ``work`` while collecting the call's events up to ``version``."""
    reader = asyncio.ensure_future(read_until(call, lambda e: e.version == version))
    await work  # type: ignore[misc]
    return await reader


async def test_pool_watch_gets_delete_when_a_node_leaves_the_pool(stub: Stub) -> None:
    await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("a", pools=["p1"])))
    await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("b", pools=["p2"])))
    call = stub.Watch(pb.WatchRequest(pool_id="p1"))
    events = await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END)
    assert [e.node_id for e in events[:-1]] == ["a"]
    token = events[-1].resume_token
    await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("b", pools=["p2", "p1"])))
    await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("a", pools=["p2"])))
    live = await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_DELETE)
    assert [(e.type, e.node_id) for e in live] == [
        (pb.WATCH_EVENT_TYPE_PUT, "b"),
        (pb.WATCH_EVENT_TYPE_DELETE, "a"),
    ]
    call.cancel()
    resumed = stub.Watch(pb.WatchRequest(pool_id="p1", resume_token=token))
    replay = await read_until(resumed, lambda e: e.type == pb.WATCH_EVENT_TYPE_DELETE)
    assert [key(e) for e in replay] == [key(e) for e in live]
    resumed.cancel()


async def test_idle_watch_gets_bookmarks_that_resume_cleanly(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(shared_redis.url, namespace, watch_bookmark_ms=150)
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await churn(stub, 1)
        call = stub.Watch(pb.WatchRequest())
        await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END)
        bookmark = await asyncio.wait_for(call.read(), 2)
        assert bookmark.type == pb.WATCH_EVENT_TYPE_BOOKMARK and bookmark.version == 1
        call.cancel()
        await churn(stub, 2)
        resumed = stub.Watch(pb.WatchRequest(resume_token=bookmark.resume_token))
        first = await asyncio.wait_for(resumed.read(), 2)
        assert (first.type, first.version) == (pb.WATCH_EVENT_TYPE_PUT, 2)
        resumed.cancel()


async def test_slow_watcher_is_cut_off_not_buffered(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    """A watcher that stops reading must not grow the sidecar's memory without bound."""
    sc = await sidecar_factory(shared_redis.url, namespace, watch_queue_max=16)
    big_labels = {f"label-{i}": "x" * 250 for i in range(60)}
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        call = stub.Watch(pb.WatchRequest())
        await read_until(call, lambda e: e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END)
        for i in range(600):  # ~15 kB a change: far past HTTP/2 flow-control windows
            await stub.RegisterNode(
                pb.RegisterNodeRequest(node=make_node("big", capacity=i + 1, labels=big_labels))
            )
        await eventually(lambda: sc.replica.watchers == 0, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while True:
                event = await asyncio.wait_for(call.read(), 5)
                assert event is not grpc.aio.EOF
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cancelled_watch_leaves_no_subscription(stub: Stub, sidecar: Sidecar) -> None:
    calls = [stub.Watch(pb.WatchRequest()) for _ in range(3)]
    for call in calls:
        await call.read()
    assert sidecar.replica.watchers == 3
    for call in calls:
        call.cancel()
    await eventually(lambda: sidecar.replica.watchers == 0)
