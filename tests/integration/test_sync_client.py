"""SyncRegistryClient against a real sidecar and a real redis-server.

The blocking client must not block the loop that serves it, so the sidecar runs on an
event loop of its own in a background thread and the tests are plain functions, as a
script using the sync client would be.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest

from registry.server import Sidecar
from registry_client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SyncRegistryClient,
    SyncWatcher,
    Unavailable,
    pb,
)
from tests.conftest import TEST_SETTINGS
from tests.support.redis_proc import RedisProcess, free_port

pytestmark = pytest.mark.timeout(60)


class SidecarThread:
    """A sidecar serving from its own event loop in a daemon thread."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self._sidecar = Sidecar(replace(TEST_SETTINGS, redis_url=redis_url, namespace=namespace))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._sidecar.start(), self._loop).result(30)
        return self._sidecar.address

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._sidecar.aclose(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


@pytest.fixture
def address(shared_redis: RedisProcess, namespace: str) -> Iterator[str]:
    sidecar = SidecarThread(shared_redis.url, namespace)
    try:
        yield sidecar.start()
    finally:
        sidecar.stop()


@pytest.fixture
def client(address: str) -> Iterator[SyncRegistryClient]:
    with SyncRegistryClient(address) as c:
        yield c


def make_node(node_id: str, *, capacity: int = 1, zone: str = "a") -> pb.Node:
    return pb.Node(
        node_id=node_id,
        address="10.0.0.1:9000",
        capacity=capacity,
        pools=["p"],
        lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
        services=[pb.InstalledService(name="mt", type="engine", version="1")],
        labels={"zone": zone},
    )


def test_register_get_list(client: SyncRegistryClient) -> None:
    registered = client.register_node(make_node("n1"), ttl_ms=60_000).node
    assert registered.status == pb.NODE_STATUS_ONLINE
    client.register_node(make_node("n2", zone="b"), ttl_ms=60_000)

    got = client.get_node("n1")
    assert got.node.node_id == "n1" and got.freshness.version > 0
    listed = client.list_nodes(pool_id="p", lang_pair=("en", "de"), labels={"zone": "b"})
    assert [n.node_id for n in listed.nodes] == ["n2"]
    assert client.list_nodes(status=pb.NODE_STATUS_DRAINING).nodes == []

    assert client.drain_node("n2").node.status == pb.NODE_STATUS_DRAINING
    assert client.deregister_node("n2").existed
    assert not client.deregister_node("n2").existed


def test_select_reserve_release_schedule(client: SyncRegistryClient) -> None:
    for node_id in ("n1", "n2"):
        client.register_node(make_node(node_id), ttl_ms=60_000)

    picked = client.select_nodes(
        "p", lang_pair=("en", "de"), required_services=["mt"], count=2, exclude_node_ids=["n2"]
    )
    assert [n.node_id for n in picked.nodes] == ["n1"]
    assert (picked.breakdown.considered, picked.breakdown.excluded_id) == (2, 1)

    slot = client.reserve_slot("n1", "job-1", lease_ms=60_000)
    assert slot.created and slot.node.running_jobs == 1
    assert not client.reserve_slot("n1", "job-1").created  # a repeat renews
    assert client.release_slot("n1", "job-1").released
    assert not client.release_slot("n1", "job-1").released

    first = client.schedule("job-2", "p", lease_ms=60_000)
    assert first.created and first.node.node_id in ("n1", "n2")
    assert client.schedule("job-2", "p").node.node_id == first.node.node_id
    selector = pb.SelectNodesRequest(pool_id="p", exclude_node_ids=[first.node.node_id])
    second = client.schedule("job-3", selector=selector)
    assert second.node.node_id != first.node.node_id
    with pytest.raises(ResourceExhausted) as full:
        client.schedule("job-4", "p")
    assert isinstance(full.value.__cause__, grpc.RpcError)
    assert full.value.breakdown is not None and full.value.breakdown.full == 2


def test_pools_and_status(client: SyncRegistryClient) -> None:
    pool = pb.Pool(pool_id="translate", lang_pairs=[pb.LanguagePair(src="en", tgt="de")])
    put = client.put_pool(pool).pool
    assert put.version > 0
    assert client.get_pool("translate").pool.lang_pairs[0].tgt == "de"
    assert [p.pool_id for p in client.list_pools().pools] == ["translate"]

    status = client.get_status()
    assert status.ready and status.mode == "NORMAL" and status.pool_count == 1


def test_errors_map_to_exception_classes(client: SyncRegistryClient) -> None:
    with pytest.raises(NotFound):
        client.get_node("missing")
    with pytest.raises(NotFound):
        client.get_pool("missing")
    with pytest.raises(InvalidArgument) as bad:
        client.register_node(pb.Node(node_id="bad id!", capacity=1))
    assert "node_id" in bad.value.details
    assert not bad.value.retryable
    client.register_node(make_node("n1"), ttl_ms=60_000)
    client.drain_node("n1")
    with pytest.raises(FailedPrecondition):
        client.reserve_slot("n1", "job-1")


def test_unreachable_sidecar_is_unavailable() -> None:
    with SyncRegistryClient(f"127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(Unavailable) as err:
            client.get_status()
        assert err.value.retryable
        with pytest.raises(Unavailable), client.watch(max_reconnects=1, backoff_max_s=0.1) as w:
            next(w)


def test_watch_snapshot_then_live_events(client: SyncRegistryClient) -> None:
    client.register_node(make_node("n1"), ttl_ms=60_000)
    with client.watch("p") as watcher:
        assert isinstance(watcher, SyncWatcher)
        snapshot = next(watcher)
        assert snapshot.type == pb.WATCH_EVENT_TYPE_SNAPSHOT and snapshot.node.node_id == "n1"
        end = next(watcher)
        assert end.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END
        assert watcher.resume_token and watcher.snapshots == 1 and watcher.connected

        client.register_node(make_node("n2"), ttl_ms=60_000)
        put = next(e for e in watcher if e.type != pb.WATCH_EVENT_TYPE_BOOKMARK)
        assert (put.type, put.node.node_id) == (pb.WATCH_EVENT_TYPE_PUT, "n2")
        token = watcher.resume_token

    # Resuming from the token skips the snapshot: the next event is the deregistration.
    with client.watch("p", resume_token=token) as resumed:
        client.deregister_node("n1")
        event = next(e for e in resumed if e.type != pb.WATCH_EVENT_TYPE_BOOKMARK)
        assert (event.type, event.node_id) == (pb.WATCH_EVENT_TYPE_DELETE, "n1")
        assert resumed.snapshots == 0


def test_watch_close_from_another_thread_ends_iteration(client: SyncRegistryClient) -> None:
    watcher = client.watch("p")
    assert next(watcher).type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END  # empty pool
    threading.Timer(0.2, watcher.close).start()
    started = time.monotonic()
    assert list(watcher) == []  # blocked waiting for a change, then ended by close()
    assert time.monotonic() - started < 5
    assert not watcher.connected
