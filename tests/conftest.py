"""Fixtures that start real processes: a redis-server per test, or one per session."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest

from tests.support.redis_proc import RedisProcess


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    """A fresh redis-server this test owns: it may kill, pause or restart it."""
    proc = RedisProcess()
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


@pytest.fixture
def redis_url(redis_proc: RedisProcess) -> str:
    """URL of this test's own redis-server."""
    return redis_proc.url


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisProcess]:
    """One redis-server for the whole session; isolate tests with :func:`namespace`.

    Never kill or pause it: other tests use it. Take ``redis_proc`` for fault tests.
    """
    proc = RedisProcess()
    try:
        proc.start()
        yield proc
    finally:
        proc.close()


@pytest.fixture
def namespace() -> str:
    """A key namespace no other test uses, so tests can share :func:`shared_redis`."""
    return "t" + secrets.token_hex(4)


# =============================================================================
# Sidecar fixtures (registry server, gRPC channel, client) — added by the lead.
# Keep them below this line so the Redis fixtures above stay independent of them.
# =============================================================================

import tempfile  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402

from registry.config import Settings  # noqa: E402
from registry.server import Sidecar  # noqa: E402
from registry_client.v1 import registry_pb2_grpc as pb_grpc  # noqa: E402

SidecarFactory = Callable[..., Awaitable[Sidecar]]

TEST_SETTINGS = Settings(
    listen="127.0.0.1:0",
    feed_block_ms=100,
    expiry_interval_ms=100,
    shutdown_grace_s=0.5,
    watchdog_timeout_ms=250,
)
"""Short periods so tests see expiry and feed effects quickly. The watchdog's timeout is
roomier than production's 25 ms so a CPU-starved CI machine (2 cores running Redis, the
sidecars and the tests) does not degrade tests that are not about degradation; the
degradation and fault tests set the production value themselves."""


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[SidecarFactory]:
    """Start sidecars with ``await make(redis_url, namespace, **settings)``; all are stopped
    at the end of the test."""
    started: list[Sidecar] = []

    async def make(
        redis_url: str,
        namespace: str,
        *,
        span_exporter: Any = None,
        metric_readers: Any = (),
        **overrides: Any,
    ) -> Sidecar:
        overrides.setdefault("data_dir", Path(tempfile.mkdtemp(prefix="registry-test-")))
        settings = replace(TEST_SETTINGS, redis_url=redis_url, namespace=namespace, **overrides)
        sidecar = Sidecar(settings, span_exporter=span_exporter, metric_readers=metric_readers)
        started.append(sidecar)
        await sidecar.start()
        return sidecar

    try:
        yield make
    finally:
        for sidecar in reversed(started):
            try:
                await asyncio.wait_for(sidecar.aclose(), 15)
            except TimeoutError:
                stacks = []
                for task in asyncio.all_tasks():
                    frames = [
                        f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                        for f in task.get_stack(limit=8)
                    ]
                    stacks.append(f"{task.get_name()}: " + " <- ".join(frames))
                raise AssertionError("sidecar.aclose() hung:\n" + "\n".join(stacks)) from None


@pytest.fixture
async def sidecar(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> Sidecar:
    """One sidecar on the session's Redis, in a namespace of its own."""
    return await sidecar_factory(shared_redis.url, namespace)


@pytest.fixture
async def stub(sidecar: Sidecar) -> AsyncIterator[pb_grpc.RegistryServiceStub]:
    """A raw generated stub on a channel to :func:`sidecar`."""
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        yield pb_grpc.RegistryServiceStub(channel)
