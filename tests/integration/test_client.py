"""The Python client against a real sidecar and a real redis-server (never mocks).

Each test gets its own redis-server (``redis_url``) and a sidecar on a free port. The
restart tests pin the sidecar to one port so the client's channel finds the new process.
Tests that need no sidecar (errors of an unreachable target) run without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

import registry
from registry.config import Settings
from registry_client import (
    AlreadyExists,
    FailedPrecondition,
    HeartbeatSession,
    InvalidArgument,
    NotFound,
    RegistryClient,
    RegistryError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    Watcher,
    pb,
)
from tests.support.redis_proc import free_port

pytestmark = pytest.mark.timeout(90)

NODE_TTL_MS = 60_000
"""Long enough that no node expires (and emits events) while a test runs."""


def _sidecar_class() -> Any:
    """The server class, imported late so this file is collected before the server exists."""
    try:
        from registry.server import Sidecar
    except ModuleNotFoundError as exc:
        if exc.name == "registry.server":
            pytest.skip("registry.server does not exist yet")
        raise
    return Sidecar


class SidecarProcess:
    """A sidecar in this event loop that a test can stop and start again on the same port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.listen
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        assert self._stack is None, "already running"
        stack = contextlib.AsyncExitStack()
        sidecar = await stack.enter_async_context(_sidecar_class()(self.settings))
        self.address = sidecar.address
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


@pytest.fixture
def make_settings(redis_url: str, namespace: str, tmp_path: Path) -> Callable[[str], Settings]:
    data_dir = tmp_path / "data"

    def make(listen: str = "127.0.0.1:0") -> Settings:
        # A short grace keeps restarts quick: open streams would otherwise hold stop() 5 s.
        return Settings(
            listen=listen,
            redis_url=redis_url,
            namespace=namespace,
            shutdown_grace_s=0.5,
            data_dir=data_dir,
        )

    return make


@pytest.fixture
async def sidecar(make_settings: Callable[[str], Settings]) -> AsyncIterator[SidecarProcess]:
    """A sidecar on a fixed free port, so tests may restart it where clients expect it."""
    proc = SidecarProcess(make_settings(f"127.0.0.1:{free_port()}"))
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
async def client(sidecar: SidecarProcess) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(sidecar.address) as c:
        yield c


@contextlib.contextmanager
def skip_if_unimplemented() -> Iterator[None]:
    """The server grows RPC by RPC; a test of one it lacks is skipped, not failed."""
    try:
        yield
    except Unimplemented as exc:
        pytest.skip(f"server: {exc.details}")


def make_node(node_id: str, *, pools: tuple[str, ...] = ("p",), capacity: int = 4) -> pb.Node:
    return pb.Node(
        node_id=node_id,
        address="10.0.0.1:9000",
        capacity=capacity,
        pools=list(pools),
        lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
        services=[pb.InstalledService(name="mt", type="engine", version="1")],
        labels={"zone": "a"},
    )


async def eventually(check: Callable[[], Any], *, timeout: float = 10.0) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value without raising."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            failure: BaseException | None = None
        except (AssertionError, RegistryError) as exc:
            failure = exc
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s") from failure
        await asyncio.sleep(0.05)


class Collector:
    """Consumes a Watcher in a task, so tests wait on conditions instead of single reads."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.events: list[pb.WatchEvent] = []
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.watcher:
                self.events.append(event)
        except Exception as exc:
            self.error = exc

    async def wait_for(self, pred: Callable[[pb.WatchEvent], bool], timeout: float = 15.0) -> int:
        """Index of the first event matching ``pred``."""

        def find() -> int | None:
            if self.error is not None:
                raise AssertionError(f"watcher failed: {self.error!r}")
            for i, event in enumerate(self.events):
                if pred(event):
                    return i + 1
            return None

        return int(await eventually(find, timeout=timeout)) - 1

    async def aclose(self) -> None:
        await self.watcher.aclose()
        await asyncio.wait_for(self._task, 5)


def is_put(node_id: str) -> Callable[[pb.WatchEvent], bool]:
    return lambda e: e.type == pb.WATCH_EVENT_TYPE_PUT and e.node.node_id == node_id


def is_type(kind: pb.WatchEventType.ValueType) -> Callable[[pb.WatchEvent], bool]:
    return lambda e: e.type == kind


def _is_server_task(task: asyncio.Task[Any]) -> bool:
    """The sidecar shares this loop; its tasks (and gRPC's server-side ones) are not ours."""
    code = getattr(task.get_coro(), "cr_code", None)
    filename = str(getattr(code, "co_filename", ""))
    return "aio/server.pyx" in filename or filename.startswith(SIDECAR_DIR)


SIDECAR_DIR = os.path.dirname(os.path.abspath(registry.__file__)) + os.sep


async def settled_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Client-side tasks started since ``before`` still running after a short grace period."""

    def extra() -> set[asyncio.Task[Any]]:
        current = asyncio.current_task()
        return {
            t
            for t in asyncio.all_tasks()
            if t not in before and t is not current and not _is_server_task(t)
        }

    for _ in range(50):
        if not extra():
            break
        await asyncio.sleep(0.02)
    return extra()


# -- unary RPCs ------------------------------------------------------------------------------


async def test_register_get_list(client: RegistryClient) -> None:
    registered = await client.register_node(make_node("n1"), ttl_ms=NODE_TTL_MS)
    assert registered.node.node_id == "n1"
    assert registered.node.status == pb.NODE_STATUS_ONLINE
    assert registered.node.capacity == 4
    await client.register_node(make_node("n2", pools=("q",)), ttl_ms=NODE_TTL_MS)

    got = await eventually(lambda: client.get_node("n1"))
    assert got.node.address == "10.0.0.1:9000"
    assert list(got.node.pools) == ["p"]
    assert dict(got.node.labels) == {"zone": "a"}
    assert got.freshness.version >= registered.node.version

    async def ids(**filters: Any) -> set[str]:
        return {n.node_id for n in (await client.list_nodes(**filters)).nodes}

    await eventually(lambda: _equal(ids(), {"n1", "n2"}))
    assert await ids(pool_id="p") == {"n1"}
    assert await ids(pool_id="q") == {"n2"}
    assert await ids(lang_pair=("en", "de")) == {"n1", "n2"}
    assert await ids(lang_pair=pb.LanguagePair(src="de", tgt="en")) == set()
    assert await ids(labels={"zone": "a"}) == {"n1", "n2"}
    assert await ids(labels={"zone": "b"}) == set()
    assert await ids(status=pb.NODE_STATUS_ONLINE) == {"n1", "n2"}
    assert await ids(status=pb.NODE_STATUS_DRAINING) == set()


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_select_reserve_release(client: RegistryClient) -> None:
    await client.register_node(make_node("n1", capacity=1), ttl_ms=NODE_TTL_MS)
    await eventually(lambda: client.get_node("n1"))

    selected = await client.select_nodes("p", lang_pair=("en", "de"), required_services=["mt"])
    assert [n.node_id for n in selected.nodes] == ["n1"]
    assert selected.breakdown.eligible == 1

    reserved = await client.reserve_slot("n1", "job-1")
    assert reserved.created
    assert reserved.node.running_jobs == 1
    assert not (await client.reserve_slot("n1", "job-1")).created  # idempotent by job id
    with pytest.raises(ResourceExhausted):
        await client.reserve_slot("n1", "job-2")

    released = await client.release_slot("n1", "job-1")
    assert released.released
    assert not (await client.release_slot("n1", "job-1")).released


async def test_schedule(client: RegistryClient) -> None:
    await client.register_node(make_node("n1", capacity=1), ttl_ms=NODE_TTL_MS)
    await eventually(lambda: client.get_node("n1"))
    with skip_if_unimplemented():
        scheduled = await client.schedule("job-3", "p", lang_pair=("en", "de"))
    assert scheduled.node.node_id == "n1"
    assert scheduled.node.running_jobs == 1
    assert scheduled.attempts >= 1
    with pytest.raises(ResourceExhausted) as full:
        await client.schedule("job-4", "p")
    breakdown = full.value.breakdown  # the status detail says why
    assert breakdown is not None and breakdown.considered == 1 and breakdown.full == 1
    with pytest.raises(AlreadyExists):  # job-3 holds its slot on n1
        await client.reserve_slot("n2", "job-3")


async def test_status(client: RegistryClient) -> None:
    await client.register_node(make_node("n1"), ttl_ms=NODE_TTL_MS)
    status = await eventually(lambda: _with_nodes(client, 1))
    assert status.ready
    assert status.mode == "NORMAL"
    assert status.version >= 1


async def _with_nodes(client: RegistryClient, count: int) -> pb.GetStatusResponse | None:
    status = await client.get_status()
    return status if status.node_count == count else None


async def test_pools(client: RegistryClient) -> None:
    pool = pb.Pool(pool_id="p", lang_pairs=[pb.LanguagePair(src="en", tgt="de")], min_health=0.2)
    with skip_if_unimplemented():
        put = await client.put_pool(pool)
    assert put.pool.pool_id == "p"
    got = await eventually(lambda: client.get_pool("p"))
    assert got.pool.min_health == pytest.approx(0.2)
    assert [p.pool_id for p in (await client.list_pools()).pools] == ["p"]
    with pytest.raises(NotFound):
        await client.get_pool("nopool")


# -- errors ----------------------------------------------------------------------------------


async def test_errors_map_to_exception_classes(client: RegistryClient) -> None:
    with pytest.raises(NotFound) as not_found:
        await client.get_node("nobody")
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(not_found.value.__cause__, grpc.aio.AioRpcError)

    with pytest.raises(InvalidArgument) as invalid:
        await client.get_node("a b")
    assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not invalid.value.retryable

    with pytest.raises(InvalidArgument):
        await client.register_node(pb.Node(node_id="a b", capacity=1))
    with pytest.raises(InvalidArgument):
        await client.reserve_slot("n1", "bad job id")
    with pytest.raises(NotFound):
        await client.reserve_slot("nobody", "job-1")

    await client.register_node(make_node("d1"), ttl_ms=NODE_TTL_MS)
    await client.drain_node("d1")
    with pytest.raises(FailedPrecondition):
        await client.reserve_slot("d1", "job-1")


async def test_unreachable_sidecar_is_unavailable() -> None:
    async with RegistryClient(f"127.0.0.1:{free_port()}", timeout=2.0) as c:
        with pytest.raises(Unavailable) as info:
            await c.get_status()
        assert info.value.retryable
        with pytest.raises(Unavailable):
            await c.heartbeat_session(make_node("n1")).start()


async def test_watch_gives_up_after_max_reconnects() -> None:
    async with RegistryClient(f"127.0.0.1:{free_port()}") as c:
        watcher = c.watch(max_reconnects=2, backoff_initial_s=0.01, backoff_jitter_s=0.01)
        with pytest.raises(Unavailable):
            await anext(watcher)
        assert watcher.reconnects == 2
        await watcher.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(watcher)


# -- heartbeat sessions ----------------------------------------------------------------------


async def test_heartbeat_acks_carry_the_request_seq(client: RegistryClient) -> None:
    metrics = pb.NodeMetrics(cpu=0.5, mem=0.25)
    async with client.heartbeat_session(
        make_node("h1"), ttl_ms=5_000, interval_ms=50, metrics_provider=lambda: metrics
    ) as session:
        await session.wait_acked(5, timeout=10)
        last = session.last_response
        assert last is not None
        assert last.seq == session.acked  # seq starts at 1, one per request, all acked
        assert last.action == pb.HEARTBEAT_ACTION_CONTINUE
        assert last.status == pb.NODE_STATUS_ONLINE
        assert last.deadline_ms > 0
        assert session.connected
        assert session.reconnects == 0
        assert session.reregistrations == 0
        node = await eventually(lambda: _heartbeated(client, "h1"))
        assert node.metrics.cpu == pytest.approx(0.5)
    assert not session.connected


async def _heartbeated(client: RegistryClient, node_id: str) -> pb.Node | None:
    node = (await client.get_node(node_id)).node
    return node if node.last_heartbeat_at > 0 and node.metrics.cpu > 0 else None


async def test_heartbeat_session_survives_sidecar_restart(
    sidecar: SidecarProcess, client: RegistryClient
) -> None:
    async with client.heartbeat_session(
        make_node("h1"), ttl_ms=10_000, interval_ms=50, backoff_max_s=0.5, backoff_jitter_s=0.1
    ) as session:
        await session.wait_acked(3, timeout=10)
        await sidecar.stop()
        await eventually(lambda: not session.connected, timeout=10)
        seq_before = session.last_response.seq if session.last_response else 0
        acked_before = session.acked

        await sidecar.start()
        await session.wait_acked(acked_before + 3, timeout=20)
        assert session.reconnects >= 1
        assert session.connected
        assert session.last_response is not None
        assert session.last_response.seq > seq_before
        assert session.error is None
        assert (await eventually(lambda: client.get_node("h1"))).node.status == (
            pb.NODE_STATUS_ONLINE
        )


async def test_heartbeat_session_reregisters_a_deregistered_node(client: RegistryClient) -> None:
    async with client.heartbeat_session(make_node("h1"), ttl_ms=5_000, interval_ms=50) as session:
        await session.wait_acked(2, timeout=10)
        assert (await client.deregister_node("h1")).existed
        await eventually(lambda: session.reregistrations >= 1)
        acked = session.acked
        await session.wait_acked(acked + 2, timeout=10)
        assert session.last_response is not None
        assert session.last_response.action == pb.HEARTBEAT_ACTION_CONTINUE
        await eventually(lambda: client.get_node("h1"))


async def test_deregister_on_close(client: RegistryClient) -> None:
    session = HeartbeatSession(client, make_node("h1"), interval_ms=50, deregister_on_close=True)
    async with session:
        await session.wait_acked(1, timeout=10)
    await eventually(lambda: _absent(client, "h1"))


async def _absent(client: RegistryClient, node_id: str) -> bool:
    try:
        await client.get_node(node_id)
    except NotFound:
        return True
    return False


# -- watch -----------------------------------------------------------------------------------


async def test_watch_snapshot_put_and_resume_after_restart(
    sidecar: SidecarProcess, client: RegistryClient
) -> None:
    await client.register_node(make_node("n0"), ttl_ms=NODE_TTL_MS)
    await eventually(lambda: client.get_node("n0"))

    collector = Collector(client.watch(backoff_max_s=0.5, backoff_jitter_s=0.1))
    try:
        end = await collector.wait_for(is_type(pb.WATCH_EVENT_TYPE_SNAPSHOT_END))
        snapshot = collector.events[:end]
        assert all(e.type == pb.WATCH_EVENT_TYPE_SNAPSHOT for e in snapshot)
        assert [e.node.node_id for e in snapshot] == ["n0"]

        await client.register_node(make_node("n1"), ttl_ms=NODE_TTL_MS)
        await collector.wait_for(is_put("n1"))
        assert collector.watcher.resume_token

        await sidecar.stop()
        await eventually(lambda: collector.watcher.reconnects >= 1)
        await sidecar.start()
        # The channel may still be in its reconnect backoff; unary calls fail fast meanwhile.
        await eventually(lambda: client.register_node(make_node("n2"), ttl_ms=NODE_TTL_MS))
        await collector.wait_for(is_put("n2"), timeout=20)

        assert collector.watcher.snapshots == 1, "the sidecar re-sent a snapshot on resume"
        live = collector.events[end + 1 :]
        changes = [
            e for e in live if e.type in (pb.WATCH_EVENT_TYPE_PUT, pb.WATCH_EVENT_TYPE_DELETE)
        ]
        assert [e.node.node_id or e.node_id for e in changes] == ["n1", "n2"]
        versions = [e.version for e in changes]
        assert versions == sorted(set(versions)), f"versions not increasing: {versions}"
        assert all(e.type != pb.WATCH_EVENT_TYPE_SNAPSHOT for e in live)
    finally:
        await collector.aclose()


async def test_watch_pool_filter(client: RegistryClient) -> None:
    collector = Collector(client.watch("q"))
    try:
        await collector.wait_for(is_type(pb.WATCH_EVENT_TYPE_SNAPSHOT_END))
        await client.register_node(make_node("in-p", pools=("p",)), ttl_ms=NODE_TTL_MS)
        await client.register_node(make_node("in-q", pools=("q",)), ttl_ms=NODE_TTL_MS)
        await collector.wait_for(is_put("in-q"))
        assert not any(is_put("in-p")(e) for e in collector.events)
    finally:
        await collector.aclose()


# -- cleanup ---------------------------------------------------------------------------------


async def test_close_leaves_no_tasks(sidecar: SidecarProcess) -> None:
    before = set(asyncio.all_tasks())
    async with RegistryClient(sidecar.address) as c:
        async with c.heartbeat_session(make_node("h1"), interval_ms=20) as session:
            await session.wait_acked(3, timeout=10)
            watcher = c.watch()
            async with watcher:
                assert (await anext(watcher)).type in (
                    pb.WATCH_EVENT_TYPE_SNAPSHOT,
                    pb.WATCH_EVENT_TYPE_SNAPSHOT_END,
                )
        assert not session.running
    assert await settled_tasks(before) == set()


async def test_cancelled_owner_leaves_no_tasks(sidecar: SidecarProcess) -> None:
    before = set(asyncio.all_tasks())
    started = asyncio.Event()

    async def node_main(c: RegistryClient) -> None:
        async with c.heartbeat_session(make_node("h1"), interval_ms=20) as session:
            await session.wait_acked(1, timeout=10)
            async with c.watch() as watcher:
                started.set()
                async for _ in watcher:
                    pass

    async with RegistryClient(sidecar.address) as c:
        owner = asyncio.create_task(node_main(c))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.1)
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
    assert await settled_tasks(before) == set()
