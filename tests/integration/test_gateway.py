"""The Lua gateway against a real Redis: retry safety, versioning, the change log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis

from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.gateway import Gateway
from registry.model import (
    EventType,
    HeartbeatIn,
    InstalledService,
    LanguagePair,
    Metrics,
    NodeSpec,
    NodeStatus,
    Pool,
    SelectionWeights,
)
from tests.support.redis_proc import RedisProcess

SPEC = NodeSpec(
    "n1",
    "h:1",
    ("p1",),
    (LanguagePair("en", "de"),),
    (InstalledService("mt", "nmt", "1"),),
    {"zone": "a"},
    2,
)


@pytest.fixture
async def gateway(shared_redis: RedisProcess, namespace: str) -> AsyncIterator[Gateway]:
    async with Gateway(shared_redis.url, namespace, reconcile_grace_ms=0) as gw:
        await gw.ensure_epoch()
        yield gw


def state(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The namespace's data, minus what only records when something ran (liveness times,
    deadlines), so two runs of a retry-safe script compare equal."""
    out: dict[str, Any] = {}
    for raw in client.scan_iter(match="{" + namespace + "}:*"):
        key = raw.decode()
        kind = client.type(key).decode()
        if kind == "hash":
            value = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
            value.pop("hb_at", None)
            if key.endswith(":jobs:n1"):
                value = sorted(value)  # job ids; lease deadlines move on renewal
            out[key] = value
        elif kind == "zset":
            out[key] = sorted(m.decode() for m in client.zrange(key, 0, -1))
        elif key.endswith(":expiry_run"):
            continue  # a timestamp of the last run, like hb_at
        elif kind == "stream":
            out[key] = [eid.decode() for eid, _ in client.xrange(key)]
        elif kind == "set":
            out[key] = sorted(m.decode() for m in client.smembers(key))
        else:
            out[key] = client.get(key)
    return out


Op = Callable[[Gateway], Awaitable[object]]

OPS: dict[str, Op] = {
    "register": lambda g: g.register(SPEC, 10_000),
    "register_with_metrics": lambda g: g.register(
        replace(SPEC, metrics=Metrics(cpu=0.123456789012345678, mem=0.95)), 10_000
    ),
    "heartbeat": lambda g: g.heartbeat(HeartbeatIn("n1", Metrics(cpu=0.7))),
    "heartbeat_reconcile": lambda g: g.heartbeat(HeartbeatIn("n1", Metrics(), ("other",))),
    "put_pool": lambda g: g.put_pool(
        Pool(
            "p1",
            frozenset({LanguagePair("en", "de")}),
            ("mt",),
            {"zone": "a"},
            0.3,
            SelectionWeights(cpu=1.0),
        )
    ),
    "reserve": lambda g: g.reserve("n1", "j1", 60_000),
    "release": lambda g: g.release("n1", "j0"),
    "drain": lambda g: g.drain("n1"),
    "deregister": lambda g: g.deregister("n1"),
    "expire": lambda g: g.expire(60_000),
}


@pytest.mark.parametrize("name", sorted(OPS))
async def test_every_script_is_safe_to_retry(
    gateway: Gateway, shared_redis: RedisProcess, namespace: str, name: str
) -> None:
    """A reply lost after the script ran makes the caller run it again: same end state."""
    await gateway.register(SPEC, 10_000)
    await gateway.reserve("n1", "j0", 60_000)
    client = shared_redis.client()
    await OPS[name](gateway)
    once = state(client, namespace)
    await OPS[name](gateway)
    assert state(client, namespace) == once


async def test_versions_and_log_ids_stay_contiguous(
    gateway: Gateway, shared_redis: RedisProcess, namespace: str
) -> None:
    await gateway.register(SPEC, 10_000)
    await gateway.heartbeat(HeartbeatIn("n1", Metrics(cpu=0.5)))
    await gateway.reserve("n1", "j1", 60_000)
    await gateway.release("n1", "j1")
    await gateway.drain("n1")
    await gateway.deregister("n1")
    client = shared_redis.client()
    ids = [eid.decode() for eid, _ in client.xrange(f"{{{namespace}}}:log")]
    assert ids == [f"{v}-0" for v in range(1, 7)]
    assert int(client.get(f"{{{namespace}}}:ver")) == 6


async def test_running_jobs_never_negative_or_above_capacity(gateway: Gateway) -> None:
    await gateway.register(SPEC, 10_000)
    results = await asyncio.gather(
        *(gateway.reserve("n1", f"j{i}", 60_000) for i in range(8)), return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, Exception)) == SPEC.capacity
    for i in range(8):
        rel = await gateway.release("n1", f"j{i}")
        assert rel.node is not None and rel.node.running_jobs >= 0
    node = await gateway.read_node("n1")
    assert node is not None and node.running_jobs == 0


async def test_heartbeats_share_one_script_call(gateway: Gateway) -> None:
    specs = [NodeSpec(f"n{i}", capacity=1) for i in range(50)]
    for spec in specs:
        await gateway.register(spec, 10_000)
    before = len(gateway.latency._samples)
    results = await asyncio.gather(
        *(gateway.heartbeat(HeartbeatIn(s.node_id, Metrics())) for s in specs)
    )
    assert all(r.outcome.value == 1 for r in results)
    assert len(gateway.latency._samples) - before <= 2, "50 concurrent heartbeats, few calls"


async def test_feed_repairs_after_a_gap(
    gateway: Gateway, shared_redis: RedisProcess, namespace: str
) -> None:
    """A replica whose position the log no longer holds resyncs, like an informer on 410,
    but fetches only the nodes whose version differs."""
    await gateway.register(SPEC, 10_000)
    replica = Replica()
    feed = ChangeFeed(gateway, replica, block_ms=50)
    await feed.preload()
    assert replica.version == 1 and replica.reloads == 1
    # While the feed is not running, changes happen and the log loses them.
    for i in range(5):
        await gateway.register(NodeSpec(f"m{i}", capacity=1), 10_000)
    await gateway.deregister("n1")
    shared_redis.client().xtrim(f"{{{namespace}}}:log", maxlen=1, approximate=False)
    sub = replica.subscribe()
    feed.start()
    try:
        for _ in range(100):
            if replica.version == 7:
                break
            await asyncio.sleep(0.02)
        assert replica.version == 7 and replica.reloads == 1 and replica.repairs == 1
        assert sorted(replica.nodes) == [f"m{i}" for i in range(5)]
        events = []
        while not sub.queue.empty():
            events.append(sub.queue.get_nowait())
        kinds = sorted((c.type.value, c.node_id) for c in events if c is not None)
        assert kinds == [("del", "n1")] + [("put", f"m{i}") for i in range(5)]
        assert replica.history_after(1) is None, "a pre-gap token must lead to a snapshot"
    finally:
        await feed.aclose()


async def test_feed_resumes_after_connection_loss(redis_proc: RedisProcess, namespace: str) -> None:
    redis_proc.stop()
    redis_proc = RedisProcess(appendonly=True)
    redis_proc.start()
    try:
        async with Gateway(redis_proc.url, namespace, timeout_s=0.3) as gw:
            await gw.ensure_epoch()
            replica = Replica()
            async with ChangeFeed(gw, replica, block_ms=50) as feed:
                await gw.register(SPEC, 10_000)
                for _ in range(100):
                    if replica.version == 1:
                        break
                    await asyncio.sleep(0.02)
                redis_proc.restart(keep_data=True)
                await gw.register(NodeSpec("n2", capacity=1), 10_000)
                for _ in range(200):
                    if replica.version == 2:
                        break
                    await asyncio.sleep(0.02)
                assert replica.version == 2 and feed.connected
                assert replica.reloads == 1, "resumed from its position, no relist"
                assert replica.get("n2") is not None
                change = replica.history_after(1)
                assert change is not None and change[0].type is EventType.PUT
                assert replica.get("n1") is not None
                assert replica.get("n1").status is NodeStatus.ONLINE  # type: ignore[union-attr]
    finally:
        redis_proc.close()
