"""Every background loop runs under the sidecar's supervisor: a failure injected into
each one is logged with its traceback, counted, and the loop restarted and working; a
loop that keeps failing turns gRPC health NOT_SERVING (registry/supervisor.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from registry.degradation import Drain
from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import eventually, register
from tests.support.redis_proc import RedisProcess

Stub = pb_grpc.RegistryServiceStub


def fail_once(obj: object, name: str) -> list[int]:
    """Make ``obj.name`` raise RuntimeError on its next call, then behave; returns a
    list whose length counts the calls made after the failure."""
    real: Callable[..., Awaitable[Any]] = getattr(obj, name)
    calls: list[int] = []
    failed = False

    async def patched(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            raise RuntimeError(f"injected failure in {name}")
        calls.append(1)
        return await real(*args, **kwargs)

    setattr(obj, name, patched)
    return calls


def target(sc: Sidecar, part: str) -> tuple[object, str]:
    return {
        "changefeed": (sc.feed._reader, "read"),
        "version-checker": (sc.checker, "check"),
        "revalidator": (sc.tiers, "revalidate_due"),
        "expiry": (sc.gateway, "expire"),
        "buffer-drain": (sc.degradation.recovery, "drain_round"),
        "backpressure": (sc.backpressure, "update"),
        "recovery": (sc.degradation.recovery, "restore"),
    }[part]


PARTS = [
    "changefeed",
    "version-checker",
    "revalidator",
    "expiry",
    "buffer-drain",
    "backpressure",
    "recovery",
]


@pytest.mark.parametrize("part", PARTS)
async def test_a_failing_loop_is_logged_counted_and_restarted(
    part: str,
    sidecar_factory: SidecarFactory,
    redis_proc: RedisProcess,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sc = await sidecar_factory(redis_proc.url, namespace, l1_ttl_ms=100, l2_ttl_ms=200)
    assert sc.supervisor is not None
    async with grpc.aio.insecure_channel(sc.address) as channel:
        stub = Stub(channel)
        await register(stub, "n1")
        obj, name = target(sc, part)
        if part == "backpressure":  # a sync method
            real = sc.backpressure.update
            state = {"failed": False, "calls": 0}

            def update(now: float | None = None) -> None:
                if not state["failed"]:
                    state["failed"] = True
                    raise RuntimeError("injected failure in update")
                state["calls"] += 1
                real(now)

            sc.backpressure.update = update  # type: ignore[method-assign]
            calls: Any = None
        else:
            calls = fail_once(obj, name)
        caplog.set_level(logging.ERROR, logger="registry.supervisor")
        if part == "buffer-drain":
            sc.degradation.buffer.add(Drain("n1"))
            sc.degradation._drain.set()
        if part == "recovery":
            sc.degradation.trip("injected outage")
        if part == "changefeed":  # the tail is in a blocking read: wake it with a write
            await register(stub, "n2")
        await eventually(lambda: sc.supervisor is not None and sc.supervisor.failures[part] == 1)
        record = next(r for r in caplog.records if f"part {part} failed" in r.getMessage())
        assert record.exc_info is not None and "injected failure" in str(record.exc_info[1])
        if calls is None:
            await eventually(lambda: state["calls"] > 0)
        else:
            await eventually(lambda: len(calls) > 0, timeout=5)
        if part == "changefeed":
            await register(stub, "n3")
            await eventually(lambda: sc.replica.get("n3") is not None)
        await eventually(lambda: sc.degradation.settled, timeout=5)
        if part == "buffer-drain":
            client = redis_proc.client()
            assert client.hget(f"{{{namespace}}}:node:n1", "status") == b"DRAINING"
        assert sc.supervisor.healthy


async def test_a_loop_that_keeps_failing_turns_health_not_serving(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    sc = await sidecar_factory(redis_proc.url, namespace)

    async def broken() -> None:
        raise RuntimeError("always")

    sc.checker.check = broken  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(sc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            return int(reply.status)

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await status() == serving
        assert sc.supervisor is not None
        await eventually(lambda: not sc.supervisor.healthy, timeout=10)
        await eventually(lambda: sc.supervisor.unhealthy_parts() == ["version-checker"])
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        got = await Stub(channel).GetStatus(pb.GetStatusRequest())
        assert got.ready  # reads go on; only the probe says the replica may go stale
