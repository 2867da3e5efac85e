"""The gateway: the only code that speaks Redis.

Writes are Lua scripts (``scripts/*.lua``, each prefixed with ``_lib.lua``) registered once
with redis-py, which calls them by SHA and reloads them on NOSCRIPT. Reads for the
replica (preload, reload, change log) are plain pipelined commands. Every call runs with
the client's socket timeout; nothing here retries blindly: the scripts are retry-safe,
so a bounded retry on connection errors (redis-py's ``Retry``) is allowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
from opentelemetry import trace
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel as SyncSentinel

from registry.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from registry.gateway.keys import Keys
from registry.model import (
    DEFAULT_WEIGHTS,
    Change,
    EventType,
    HeartbeatIn,
    HeartbeatOutcome,
    HeartbeatResult,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeSpec,
    NodeStatus,
    Pool,
    Release,
    Reservation,
    SelectionWeights,
)

log = logging.getLogger(__name__)

SNAPSHOT_BATCH = 500
"""Nodes fetched per pipelined round trip during preload and reload."""
VERSIONS_BATCH = 2000
"""Node versions read per call of versions.lua (about 0.5 ms of Redis)."""

SCRIPT_NAMES = (
    "lift",
    "register",
    "heartbeat",
    "deregister",
    "drain",
    "reserve",
    "release",
    "expire",
    "put_pool",
    "versions",
)


def _load_scripts() -> dict[str, str]:
    folder = resources.files("registry.gateway") / "scripts"
    lib = (folder / "_lib.lua").read_text()
    return {name: lib + "\n" + (folder / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def node_from_fields(node_id: str, f: dict[str, str], previous: Node | None = None) -> Node:
    """Decode a node hash (or a log entry, which carries the same fields)."""
    spec_json = f.get("spec", "{}")
    if previous is not None and previous.spec_json == spec_json:
        address, pools, lang_pairs = previous.address, previous.pools, previous.lang_pairs
        services, labels, names = previous.services, previous.labels, previous.service_names
    else:
        spec = json.loads(spec_json)
        address = spec.get("address", "")
        pools = frozenset(spec.get("pools", ()))
        lang_pairs = frozenset(LanguagePair(s, t) for s, t in spec.get("lang_pairs", ()))
        services = tuple(InstalledService(n, t, v) for n, t, v in spec.get("services", ()))
        labels = dict(spec.get("labels", {}))
        names = frozenset(s.name for s in services)
    return Node(
        node_id=node_id,
        address=address,
        pools=pools,
        lang_pairs=lang_pairs,
        services=services,
        labels=labels,
        capacity=int(f.get("capacity", 0)),
        status=NodeStatus(f.get("status", "ONLINE")),
        metrics=Metrics(
            cpu=float(f.get("cpu", 0)),
            gpu=float(f.get("gpu", 0)),
            mem=float(f.get("mem", 0)),
            load=float(f.get("load", 0)),
            error_rate=float(f.get("err", 0)),
            heartbeat_delay=float(f.get("delay", 0)),
        ),
        running_jobs=int(f.get("jobs", 0)),
        health_score=float(f.get("health", 1)),
        version=int(f.get("ver", 0)),
        registered_at=int(float(f.get("reg_at", 0))),
        last_heartbeat_at=int(float(f.get("hb_at", 0))),
        ttl_ms=int(f.get("ttl", 0)),
        spec_json=spec_json,
        service_names=names,
    )


def change_from_entry(entry_id: Any, raw: dict[Any, Any], previous: Node | None) -> Change:
    version = int(_text(entry_id).split("-", 1)[0])
    fields = {_text(k): _text(v) for k, v in raw.items()}
    op = fields.pop("op", "put")
    node_id = fields.pop("id", "")
    if op == "del":
        return Change(version, EventType.DELETE, node_id, None)
    if op == "pool":
        pool = Pool.from_json(node_id, fields.get("spec", "{}"), version)
        return Change(version, EventType.POOL, node_id, None, pool)
    return Change(version, EventType.PUT, node_id, node_from_fields(node_id, fields, previous))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every node as of ``version`` (read before the nodes, so tailing from it is safe)."""

    version: int
    nodes: list[Node]
    pools: list[Pool]


@dataclass(frozen=True, slots=True)
class LogRead:
    changes: list[Change]
    first_version: int
    """Version of the oldest entry still in the log (0 when empty)."""


Recorder = Callable[[str, float, BaseException | None], None]
"""Told every timed Redis operation: its name, seconds taken, and the failure if any."""


class LatencyWindow:
    """Recent Redis round trips, for GetStatus percentiles (metrics have histograms)."""

    def __init__(self, size: int = 1024) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def percentile(self, q: float) -> float:
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


class _Op:
    """Times one Redis operation, tells the breaker and the recorder, and turns a Redis
    failure into ``Unavailable``. A plain ``with`` (no allocation of a generator), since
    every hot-path call goes through it."""

    __slots__ = ("_gw", "_hot", "_name", "_script", "_start")

    def __init__(self, gw: Gateway, name: str, hot: bool, script: bool) -> None:
        self._gw = gw
        self._name = name
        self._hot = hot
        self._script = script
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        elapsed = time.perf_counter() - self._start
        gw = self._gw
        if gw.recorder is not None and (exc is None or isinstance(exc, (RedisError, OSError))):
            gw.recorder(self._name, elapsed, exc)
        if exc is None:
            gw.last_answer = time.monotonic()
            if self._hot:
                gw._observe(None)
                gw.latency.add(elapsed)
            return
        if not isinstance(exc, (RedisError, OSError)):
            return
        # A script's own error (a ResponseError) says nothing about Redis being reachable.
        transport = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
        if self._hot and (transport or not self._script):
            gw._observe(exc)
        raise Unavailable(f"redis unavailable during {self._name}: {exc}") from exc


class Gateway:
    """Redis access for one namespace. Use as ``async with Gateway(...)``."""

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        timeout_s: float = 1.0,
        hot_timeout_s: float | None = None,
        log_maxlen: int = 50_000,
        metrics_epsilon: float = 0.05,
        heartbeat_batch_max: int = 256,
        weights: SelectionWeights = DEFAULT_WEIGHTS,
        reconcile_grace_ms: int = 10_000,
        adopt_lease_ms: int = 60_000,
    ) -> None:
        self.keys = Keys(namespace)
        self.url = url
        self.client_name = f"registry:{namespace}:{secrets.token_hex(4)}"
        """CLIENT SETNAME of this sidecar's connections, so an operator can find them."""
        self._timeout = timeout_s
        self._maxlen = log_maxlen
        self._eps = metrics_epsilon
        self._batch_max = heartbeat_batch_max
        self._weights = weights.health_vector()
        self._grace = reconcile_grace_ms
        self._adopt_lease = adopt_lease_ms
        self.observer: Callable[[str | None, str], None] | None = None
        """Told the outcome of every hot-path call, None, "timeout" or "error", with a
        description: the circuit breaker listens here."""
        self.epoch = ""
        """Identity of the data set, as of the last ensure_epoch."""
        hot = timeout_s if hot_timeout_s is None else hot_timeout_s
        # Hot path: writes, version checks, pings. A short timeout and no retry of a
        # timeout, so a frozen Redis (it sends no reset) is noticed within tens of ms.
        self.redis = connect(url, hot, self.client_name, 64, retries=1)
        # Bulk reads (preload, repair, log catch-up): large replies, a longer timeout.
        self.bulk = connect(url, timeout_s, f"{self.client_name}:bulk", 8, retries=1)
        self._scripts: dict[str, AsyncScript] = {
            name: self.redis.register_script(body) for name, body in _load_scripts().items()
        }
        self._versions = self.bulk.register_script(_load_scripts()["versions"])
        self._pending: list[
            tuple[HeartbeatIn, asyncio.Future[HeartbeatResult], trace.Span | None]
        ] = []
        self._flusher: asyncio.Task[None] | None = None
        self._in_flight: list[asyncio.Future[HeartbeatResult]] = []
        """Futures of the heartbeat batch at Redis now (``abandon_heartbeats``)."""
        self.stretch = 1.0
        """Heartbeat interval multiplier the sidecar currently tells nodes (backpressure):
        deadlines and the expected interval stretch by it (see heartbeat.lua)."""
        self.last_answer = time.monotonic()
        """When Redis last answered any call of this sidecar: evidence of life for the
        failure detector (a busy Redis answers late, a frozen one not at all)."""
        self.latency = LatencyWindow()
        self.recorder: Recorder | None = None
        """Told every timed operation (the metrics' Redis latency histogram)."""
        self.tracer: trace.Tracer | None = None
        """Set when tracing is on: each heartbeat batch gets a span."""
        self.log = LogReader(self.bulk, self.keys, None, owned=False, gateway=self)
        """Non-blocking reads of the change log on the shared pool (catch-up, resume)."""

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.redis.aclose()
        await self.bulk.aclose()

    def log_reader(self, block_ms: int) -> LogReader:
        """A reader of the change log on a connection of its own, so blocking reads never
        hold a pool slot that a write is waiting for; its timeout covers the block time."""
        client = connect(
            self.url,
            self._timeout + block_ms / 1000,
            f"{self.client_name}:feed",
            2,
            retries=0,
            connect_timeout=self._timeout,
        )
        return LogReader(client, self.keys, block_ms, gateway=self)

    def probe(self, timeout_s: float) -> Callable[[], Probe]:
        """A factory, for the failure detector's thread, of a connection of its own that
        it drives by hand (a sync client: it runs outside the loop). ``timeout_s``
        bounds connecting and reading an answer already there, not the wait for it."""

        def make() -> Probe:
            client = connect_sync(self.url, timeout_s, f"{self.client_name}:detector")
            return Probe(client)

        return make

    def _observe(self, exc: BaseException | None) -> None:
        if self.observer is None:
            return
        if exc is None:
            self.observer(None, "")
        elif isinstance(exc, (RedisTimeoutError, TimeoutError)):
            self.observer("timeout", f"{type(exc).__name__}: {exc}")
        else:
            self.observer("error", f"{type(exc).__name__}: {exc}")

    def _op(self, name: str, *, hot: bool = True, script: bool = False) -> _Op:
        return _Op(self, name, hot, script)

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        with self._op(name, script=True):
            return await self._scripts[name](keys=list(keys), args=list(args))

    # --- setup -----------------------------------------------------------------------

    async def ensure_epoch(self) -> str:
        """Return this data set's identity, creating it on first use.

        The version counter is also pulled forward to the log's last id: if the counter
        were ever behind the log (partial restore), XADD with an explicit id would fail.
        """
        with self._op("ensure_epoch", hot=False):
            await self.bulk.set(self.keys.epoch, secrets.token_hex(8), nx=True)
            epoch = _text(await self.bulk.get(self.keys.epoch))
            last = await self.bulk.xrevrange(self.keys.log, count=1)
        if last:
            await self.lift(int(_text(last[0][0]).split("-", 1)[0]))
        self.epoch = epoch
        return epoch

    async def read_epoch(self) -> str | None:
        """The data set's identity as Redis has it now (None: Redis lost it)."""
        with self._op("GET epoch"):
            raw = await self.redis.get(self.keys.epoch)
        return None if raw is None else _text(raw)

    async def lift(self, floor: int) -> int:
        """Raise the version counter to at least ``floor`` (never lower it): after Redis
        lost data, versions must not go backwards for watchers, and XADD with an explicit
        id must stay above the log's last id."""
        return int(await self._call("lift", [self.keys.version], [floor]))

    async def ping(self) -> None:
        with self._op("PING"):
            await self.redis.ping()

    # --- writes ----------------------------------------------------------------------

    async def register(
        self, spec: NodeSpec, ttl_ms: int, *, adopt_ms: int = 0
    ) -> tuple[Node, bool]:
        """``adopt_ms``: for this long the node's job reports re-create reservations
        (after Redis lost them; see register.lua)."""
        k = self.keys
        args: list[Any] = [
            spec.node_id, spec.to_json(), spec.capacity, ttl_ms, self._maxlen, adopt_ms
        ]  # fmt: skip
        if (m := spec.metrics) is not None:
            args += ["1", m.cpu, m.gpu, m.mem, m.load, m.error_rate, *self._weights]
        changed, flat = await self._call(
            "register",
            [k.node(spec.node_id), k.jobs(spec.node_id), k.nodes, k.version, k.log, k.expiry],
            args,
        )
        return node_from_fields(spec.node_id, _pairs(flat)), bool(changed)

    def submit_heartbeat(
        self, hb: HeartbeatIn, span: trace.Span | None = None
    ) -> asyncio.Future[HeartbeatResult]:
        """Queue a heartbeat; concurrent heartbeats share one script call.

        While one batch is in flight, the next one collects, so the batch size follows
        the load without adding a timer delay to a lone heartbeat. Returns a plain
        future (no task per heartbeat: this is the hottest path of the sidecar).
        ``span`` (tracing on) is the message's span, which its batch's span links to.
        """
        future: asyncio.Future[HeartbeatResult] = asyncio.get_running_loop().create_future()
        self._pending.append((hb, future, span))
        if self._flusher is None or self._flusher.done():
            # A context of its own: the flusher serves every stream, not the one whose
            # heartbeat happened to start it (its spans must not land in that trace).
            self._flusher = asyncio.create_task(
                self._flush_heartbeats(), name="heartbeat-flush", context=contextvars.Context()
            )
        return future

    async def heartbeat(self, hb: HeartbeatIn) -> HeartbeatResult:
        return await self.submit_heartbeat(hb)

    def abandon_heartbeats(self, exc: Exception) -> None:
        """Redis is down: every heartbeat waiting for it fails now with ``exc`` (its
        stream buffers it) instead of waiting out the deadline; the batch at Redis is
        cancelled (it may still have been applied: replaying it is harmless)."""
        for fut in self._in_flight:
            if not fut.done():
                fut.set_exception(exc)
        for _, fut, _ in self._pending:
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        self._in_flight = []
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        self._flusher = None

    @property
    def heartbeats_queued(self) -> int:
        """Heartbeats waiting for a batch (the ingest queue)."""
        return len(self._pending)

    async def _flush_heartbeats(self) -> None:
        while self._pending:
            batch = self._pending[: self._batch_max]
            del self._pending[: self._batch_max]
            beats = [hb for hb, _, _ in batch]
            self._in_flight = [fut for _, fut, _ in batch]
            try:
                if self.tracer is None:
                    results = await self._heartbeat_batch(beats)
                else:
                    links = [trace.Link(span.get_span_context()) for _, _, span in batch if span]
                    with self.tracer.start_as_current_span(
                        "heartbeat batch",
                        links=links,
                        attributes={"registry.batch.size": len(batch)},
                    ):
                        results = await self._heartbeat_batch(beats)
            except Exception as exc:  # every waiter gets the failure
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut, _), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _heartbeat_batch(self, beats: Sequence[HeartbeatIn]) -> list[HeartbeatResult]:
        k = self.keys
        keys = [k.version, k.log, k.expiry, k.leases, k.jobnode]
        args: list[Any] = [
            self._maxlen, self._eps, *self._weights, self._grace, k.prefix, self._adopt_lease,
            self.stretch,
        ]  # fmt: skip
        for hb in beats:
            m = hb.metrics
            jobs = "-" if hb.running_job_ids is None else "+" + ",".join(hb.running_job_ids)
            args.append(
                f"{hb.node_id}|{m.cpu!r}|{m.gpu!r}|{m.mem!r}|{m.load!r}|{m.error_rate!r}|{jobs}"
            )
        rows = await self._call("heartbeat", keys, args)
        out = []
        for outcome, version, status, deadline, changed, ttl, released in rows:
            text = _text(status)
            out.append(
                HeartbeatResult(
                    outcome=HeartbeatOutcome(int(outcome)),
                    version=int(version),
                    status=NodeStatus(text) if text else None,
                    deadline_ms=int(deadline),
                    changed=bool(changed),
                    ttl_ms=int(ttl),
                    released_job_ids=tuple(_text(j) for j in released),
                )
            )
        return out

    async def deregister(self, node_id: str) -> tuple[bool, int]:
        k = self.keys
        existed, version = await self._call(
            "deregister",
            [
                k.node(node_id),
                k.jobs(node_id),
                k.nodes,
                k.version,
                k.log,
                k.expiry,
                k.leases,
                k.jobnode,
            ],
            [node_id, self._maxlen],
        )
        return bool(existed), int(version)

    async def drain(self, node_id: str) -> tuple[Node, bool]:
        k = self.keys
        outcome, flat = await self._call(
            "drain", [k.node(node_id), k.version, k.log], [node_id, self._maxlen]
        )
        if outcome == 0:
            raise NotFound(f"node {node_id!r} is not registered")
        return node_from_fields(node_id, _pairs(flat)), outcome == 1

    async def reserve(
        self, node_id: str, job_id: str, lease_ms: int, *, replay: bool = False
    ) -> Reservation:
        """``replay``: a slot granted locally while degraded, recorded even beyond
        capacity (see reserve.lua)."""
        k = self.keys
        outcome, deadline, detail = await self._call(
            "reserve",
            [k.node(node_id), k.jobs(node_id), k.version, k.log, k.leases, k.jobnode],
            [node_id, job_id, lease_ms, self._maxlen, "1" if replay else "0"],
        )
        if outcome == 0:
            raise NotFound(f"node {node_id!r} is not registered")
        if outcome == 3:
            raise FailedPrecondition(f"node {node_id!r} is {_text(detail)}, not ONLINE")
        if outcome == 4:
            raise ResourceExhausted(f"node {node_id!r} has no free slot")
        if outcome == 5:
            holder = _text(detail)
            raise AlreadyExists(f"job {job_id!r} already holds a slot on node {holder!r}", holder)
        node = node_from_fields(node_id, _pairs(detail))
        return Reservation(node=node, created=outcome == 1, lease_deadline_ms=int(deadline))

    async def release(self, node_id: str, job_id: str) -> Release:
        k = self.keys
        released, flat = await self._call(
            "release",
            [k.node(node_id), k.jobs(node_id), k.version, k.log, k.leases, k.jobnode],
            [node_id, job_id, self._maxlen],
        )
        node = node_from_fields(node_id, _pairs(flat)) if flat else None
        return Release(released=bool(released), node=node)

    async def expire(
        self, grace_ms: int, batch: int = 500, pause_ms: int = 5_000
    ) -> tuple[int, int, int, int]:
        """(nodes marked offline, nodes removed, leases freed, ms every deadline moved
        by after a pause of more than ``pause_ms`` in expiry runs: self-preservation)."""
        k = self.keys
        offline, removed, freed, shifted = await self._call(
            "expire",
            [k.version, k.log, k.expiry, k.leases, k.nodes, k.jobnode, k.expiry_run],
            [k.prefix, self._maxlen, grace_ms, batch, pause_ms],
        )
        return int(offline), int(removed), int(freed), int(shifted)

    async def put_pool(self, pool: Pool) -> tuple[Pool, bool]:
        k = self.keys
        changed, flat = await self._call(
            "put_pool",
            [k.pool(pool.pool_id), k.pools, k.version, k.log],
            [pool.pool_id, pool.to_json(), self._maxlen],
        )
        f = _pairs(flat)
        return Pool.from_json(pool.pool_id, f["spec"], int(f["ver"])), bool(changed)

    # --- reads -----------------------------------------------------------------------

    async def state(self) -> tuple[int, str | None]:
        """The registry version and the data set's epoch, in one round trip."""
        with self._op("MGET version epoch"):
            raw_version, raw_epoch = await self.redis.mget(self.keys.version, self.keys.epoch)
        return int(_text(raw_version or 0)), None if raw_epoch is None else _text(raw_epoch)

    async def version(self) -> int:
        with self._op("GET version"):
            raw = await self.redis.get(self.keys.version)
        return int(_text(raw or 0))

    async def snapshot(self) -> Snapshot:
        """Read every node in pipelined batches.

        The version is read first: tailing the log from it may replay changes the
        snapshot already holds, which the replica skips by node version.
        """
        with self._op("snapshot", hot=False):
            version = int(_text(await self.bulk.get(self.keys.version) or 0))
            members: set[Any] = await self.bulk.smembers(self.keys.nodes)  # type: ignore[misc]
            nodes = await self._read_nodes(sorted(_text(i) for i in members))
            pools = await self._read_pools()
        return Snapshot(version=version, nodes=nodes, pools=pools)

    async def read_nodes(self, ids: Sequence[str]) -> list[Node]:
        """The nodes of ``ids`` that exist, in pipelined batches."""
        with self._op("read_nodes", hot=False):
            return await self._read_nodes(ids)

    async def _read_nodes(self, ids: Sequence[str]) -> list[Node]:
        nodes: list[Node] = []
        for start in range(0, len(ids), SNAPSHOT_BATCH):
            chunk = ids[start : start + SNAPSHOT_BATCH]
            async with self.bulk.pipeline(transaction=False) as pipe:
                for node_id in chunk:
                    pipe.hgetall(self.keys.node(node_id))
                rows = await pipe.execute()
            for node_id, row in zip(chunk, rows, strict=True):
                if row:
                    nodes.append(node_from_fields(node_id, _pairs(_flatten(row))))
        return nodes

    async def node_versions(self, ids: Sequence[str] | None = None) -> tuple[int, dict[str, int]]:
        """The registry version, then the version of each node (of ``ids``, or of all).

        Cheap next to a snapshot (one small reply per batch: ``versions.lua``), so a
        replica can tell which nodes changed and fetch only those. The registry version is
        read first: a node changed after it shows a higher version, which only costs a
        needless fetch.
        """
        with self._op("node_versions", hot=False):
            if ids is None:
                members: set[Any] = await self.bulk.smembers(self.keys.nodes)  # type: ignore[misc]
                ids = sorted(_text(i) for i in members)
            version = None
            out: dict[str, int] = {}
            for start in range(0, max(len(ids), 1), VERSIONS_BATCH):
                chunk = ids[start : start + VERSIONS_BATCH]
                reply = await self._versions(
                    keys=[self.keys.version], args=[self.keys.prefix, *chunk]
                )
                if version is None:
                    version = int(reply[0])
                for node_id, raw in zip(chunk, reply[1:], strict=True):
                    if raw >= 0:
                        out[node_id] = int(raw)
        return version or 0, out

    async def read_pools(self) -> list[Pool]:
        with self._op("read_pools", hot=False):
            return await self._read_pools()

    async def _read_pools(self) -> list[Pool]:
        members: set[Any] = await self.bulk.smembers(self.keys.pools)  # type: ignore[misc]
        ids = sorted(_text(i) for i in members)
        async with self.bulk.pipeline(transaction=False) as pipe:
            for pool_id in ids:
                pipe.hgetall(self.keys.pool(pool_id))
            rows = await pipe.execute()
        pools = []
        for pool_id, row in zip(ids, rows, strict=True):
            f = _pairs(_flatten(row))
            if "spec" in f:
                pools.append(Pool.from_json(pool_id, f["spec"], int(f.get("ver", 0))))
        return pools

    async def job_holder(self, job_id: str) -> str | None:
        """The node whose slot the job holds, if any."""
        with self._op("HGET jobnode"):
            holder = await self.redis.hget(self.keys.jobnode, job_id)  # type: ignore[misc]
        return None if holder is None else _text(holder)

    async def read_node(self, node_id: str) -> Node | None:
        with self._op("HGETALL node"):
            row: dict[Any, Any] = await self.redis.hgetall(self.keys.node(node_id))  # type: ignore[misc]
        return node_from_fields(node_id, _pairs(_flatten(row))) if row else None


class LogReader:
    """Tails the change log: entries after a version, blocking while there are none."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        block_ms: int | None,
        *,
        owned: bool = True,
        gateway: Gateway | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._block_ms = block_ms
        self._owned = owned
        self._gateway = gateway

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def read(
        self, after: int, count: int, previous: Mapping[str, Node] | None = None
    ) -> LogRead:
        """Entries with a version above ``after``; blocks up to the block time (if any) when
        there are none.

        ``previous`` lets unchanged node specs be reused instead of parsed again.
        """
        try:
            reply = await self._client.xread(
                {self._keys.log: f"{after}-0"}, count=count, block=self._block_ms
            )
            if self._gateway is not None:
                self._gateway.last_answer = time.monotonic()
            changes: list[Change] = []
            known = previous or {}
            for _stream, entries in reply or ():
                for entry_id, raw in entries:
                    node_id = _text(raw.get(b"id", b""))
                    changes.append(change_from_entry(entry_id, raw, known.get(node_id)))
            first = 0
            if changes and changes[0].version != after + 1:
                info = await self._client.xinfo_stream(self._keys.log)
                first_entry = info.get("first-entry")
                first = int(_text(first_entry[0]).split("-", 1)[0]) if first_entry else 0
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis unavailable while reading the change log: {exc}") from exc
        return LogRead(changes=changes, first_version=first)


class Probe:
    """One connection the failure detector drives by hand: send a PING, poll the socket
    for the answer with its own timing, read it. A closed, reset or refused connection
    raises (redis-py's ``ConnectionError``), which is the point."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None

    def send(self) -> None:
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
        self._conn.send_command("PING", check_health=False)

    def ready(self, timeout: float) -> bool:
        ready: bool = self._conn.can_read(timeout=timeout)
        return ready

    def read(self) -> None:
        self._conn.read_response()

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._client.connection_pool.release(conn)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` ->
    (sentinels, service, db, password)."""
    rest = url[len("redis+sentinel://") :]
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = auth.split(":", 1)[-1] or None
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("redis+sentinel:// URL needs a service name: .../mymaster")
    sentinels = []
    for host in hosts.split(","):
        name, sep, port = host.rpartition(":")
        if not sep:  # no port given
            name, port = host, ""
        sentinels.append((name or "127.0.0.1", int(port or 26379)))
    return sentinels, service, int(db or 0), password


def connect(
    url: str,
    timeout_s: float,
    name: str,
    max_connections: int,
    *,
    retries: int,
    connect_timeout: float | None = None,
) -> aioredis.Redis:
    """A client for ``url``: redis://, rediss://, unix://, or
    ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``, which asks
    the Sentinels for the current primary (and again after a failover)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": connect_timeout or timeout_s,
        "health_check_interval": 0,
        "max_connections": max_connections,
        "client_name": name,
    }
    # Retry only a connection error (a stale pooled connection after a Redis restart, a
    # reset): it is definitive and the retry goes to a new connection. Never a timeout:
    # redis-py's default Retry would, doubling how long a frozen Redis takes to notice.
    options["retry"] = Retry(
        NoBackoff() if retries == 1 else ExponentialWithJitterBackoff(base=0.01, cap=0.1),
        retries,
        supported_errors=(RedisConnectionError,),
    )
    if not url.startswith("redis+sentinel://"):
        client: aioredis.Redis = aioredis.Redis.from_url(url, **options)
        return client
    sentinels, service, db, password = parse_sentinel_url(url)
    options.pop("max_connections")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout or timeout_s
    )
    primary: aioredis.Redis = sentinel.master_for(service, password=password, db=db, **options)
    return primary


def connect_sync(url: str, timeout_s: float, name: str) -> redis.Redis:
    """A blocking client (the watchdog thread's), for the same URLs as ``connect``."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "client_name": name,
        "retry": SyncRetry(NoBackoff(), 0),
    }
    if not url.startswith("redis+sentinel://"):
        return redis.Redis.from_url(url, **options)
    sentinels, service, db, password = parse_sentinel_url(url)
    sentinel = SyncSentinel(sentinels, socket_timeout=timeout_s)  # type: ignore[no-untyped-call]
    primary: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        service, password=password, db=db, **options
    )
    return primary


def _flatten(row: dict[Any, Any]) -> list[Any]:
    out: list[Any] = []
    for key, value in row.items():
        out += [key, value]
    return out
