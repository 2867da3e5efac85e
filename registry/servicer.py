"""RegistryService: decode and validate, call the domain, encode. Nothing else.

Errors: the domain raises RegistryError subclasses; ``STATUS`` maps each to a gRPC code
and ``_mapped`` applies it, once, around every handler.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status
from opentelemetry.trace import Span, Tracer

from registry import convert, validation
from registry.backpressure import Backpressure
from registry.cache import Replica, for_pool
from registry.changefeed import ChangeFeed
from registry.config import Settings
from registry.degradation import (
    Degradation,
    Deregister,
    Drain,
    PutPool,
    Register,
    ReleaseSlot,
)
from registry.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RegistryError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from registry.gateway import Gateway
from registry.health import health_score
from registry.model import (
    Change,
    EventType,
    HeartbeatIn,
    HeartbeatOutcome,
    HeartbeatResult,
    Metrics,
    Node,
    NodeSpec,
    NodeStatus,
    Reservation,
    SelectionWeights,
)
from registry.scheduler import schedule
from registry.selection import list_nodes, select
from registry.tiers import Tiers
from registry.versions import VersionChecker
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATUS: dict[type[RegistryError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Aborted: grpc.StatusCode.ABORTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
}

SHUTTING_DOWN = "sidecar shutting down; reconnect (resume a watch with its last token)"

HEARTBEAT_IN_FLIGHT = 64
"""Heartbeats of one stream that may await Redis at once (responses keep their order)."""

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[..., Awaitable[R]]


RESERVE_OUTCOMES: dict[type[RegistryError], str] = {
    NotFound: "not_found",
    FailedPrecondition: "not_online",
    ResourceExhausted: "full",
    AlreadyExists: "held_elsewhere",
    Unavailable: "unavailable",
}
"""How a failed reservation is counted (``registry.reservations`` by outcome)."""


def status_of(exc: RegistryError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return grpc.StatusCode.UNKNOWN


def _mapped(handler: Handler[R]) -> Handler[R]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await handler(self, request, context)
        except RegistryError as exc:
            await _abort(context, exc)
            raise  # abort raises; this line is never reached

    return wrapper


def _mapped_stream(
    handler: Callable[..., AsyncIterator[R]],
) -> Callable[..., AsyncIterator[R]]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            async for item in handler(self, request, context):
                yield item
        except RegistryError as exc:
            await context.abort(status_of(exc), str(exc))

    return wrapper


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        replica: Replica,
        feed: ChangeFeed,
        checker: VersionChecker,
        tiers: Tiers,
        degradation: Degradation,
        backpressure: Backpressure,
    ) -> None:
        self._s = settings
        self._bp = backpressure
        self._weights = settings.weights()
        self._gateway = gateway
        self._replica = replica
        self._feed = feed
        self._checker = checker
        self._tiers = tiers
        self._deg = degradation
        self._streamed: collections.Counter[str] = collections.Counter()
        """Node ids of the open heartbeat streams (a stream counts its first node)."""
        self._started = time.monotonic()
        self.heartbeat_streams = 0
        self.heartbeats_received = 0
        self.heartbeat_acks: collections.Counter[HeartbeatOutcome] = collections.Counter()
        self.reservations: collections.Counter[tuple[str, str]] = collections.Counter()
        """(rpc, outcome) -> count: created, renewed, or why it failed."""
        self.empty_selections: collections.Counter[str] = collections.Counter()
        """rpc -> selections that found no eligible node."""
        self._closing = False
        self.tracer: Tracer | None = None
        """Set when tracing is on: a span per heartbeat message."""
        self._closers: set[Callable[[], object]] = set()
        """One per open stream: ends it so shutdown need not wait out the grace period."""

    def streamed_nodes(self) -> list[str]:
        return list(self._streamed)

    def close_streams(self) -> None:
        """End every open stream with UNAVAILABLE so its client reconnects elsewhere."""
        self._closing = True
        for close in list(self._closers):
            close()

    # --- helpers ----------------------------------------------------------------------

    def _freshness(self) -> pb.Freshness:
        r = self._replica
        return pb.Freshness(
            version=r.version,
            staleness_ms=max(r.staleness_ms(), 0),
            degraded=self._deg.suspect or not self._feed.connected,
        )

    def _require_ready(self) -> None:
        if not self._replica.ready:
            raise Unavailable("the replica is still loading; retry shortly")

    def _token(self, version: int) -> str:
        return f"{self._gateway.epoch}:{version}"

    def _parse_token(self, token: str) -> int | None:
        """The version a token stands for, or None when it is from another data set."""
        epoch, _, version = token.rpartition(":")
        if not epoch or not version.isdigit():
            raise InvalidArgument("resume_token", "is not a token this service issued")
        return int(version) if epoch == self._gateway.epoch else None

    # --- writes -----------------------------------------------------------------------

    @_mapped
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: Context
    ) -> pb.RegisterNodeResponse:
        if not request.HasField("node"):
            raise InvalidArgument("node", "is required")
        spec = validation.check_spec(convert.spec_from_pb(request.node))
        s = self._s
        ttl = validation.check_ttl(
            "ttl_ms", request.ttl_ms, s.default_ttl_ms, s.min_ttl_ms, s.max_ttl_ms
        )
        done = await self._deg.write(Register(spec, ttl))
        if done is None:  # buffered while degraded
            pending = _pending_node(spec, ttl, self._replica.get(spec.node_id), self._weights)
            return pb.RegisterNodeResponse(node=convert.node_to_pb(pending))
        node, _ = done
        self._replica.apply_local(node, node.node_id, node.version)
        return pb.RegisterNodeResponse(node=convert.node_to_pb(node))

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[pb.HeartbeatRequest],
        context: Context,
    ) -> AsyncIterator[pb.HeartbeatResponse]:
        """Reads ahead so one stream can have several heartbeats at Redis; answers in order.

        The queue is unbounded so its end marker can always be put, even when the
        stream ends with the queue full; a semaphore bounds the heartbeats in flight.
        """
        pending: asyncio.Queue[
            tuple[int, HeartbeatIn, asyncio.Future[HeartbeatResult] | None, Span | None] | None
        ] = asyncio.Queue()
        tracer = self.tracer
        in_flight = asyncio.Semaphore(HEARTBEAT_IN_FLIGHT)
        failure: list[RegistryError] = []
        streamed: list[str] = []
        deg_buffer = self._deg.buffer
        buffered = deg_buffer.heartbeats

        async def read() -> None:
            try:
                async for req in request_iterator:
                    try:
                        beat = self._decode_heartbeat(req)
                    except RegistryError as exc:
                        failure.append(exc)
                        return
                    self.heartbeats_received += 1
                    if self._bp.full:  # gRPC flow control holds the node back meanwhile
                        await self._bp.room()
                    if not streamed:
                        streamed.append(beat.node_id)
                        self._streamed[beat.node_id] += 1
                    await in_flight.acquire()
                    span = None
                    if tracer is not None:
                        span = tracer.start_span(
                            "Heartbeat message",
                            attributes={"registry.node_id": beat.node_id, "registry.seq": req.seq},
                        )
                    sent = None
                    # Behind a buffered write of its node (a registration not replayed
                    # yet), a heartbeat is buffered too: order per node holds.
                    if not self._deg.degraded and not deg_buffer.pending_node(beat.node_id):
                        if beat.node_id in buffered:  # newer than the one in the buffer
                            self._deg.buffer.supersede(beat.node_id)
                        sent = self._gateway.submit_heartbeat(beat, span)
                    pending.put_nowait((req.seq, beat, sent, span))
            finally:
                pending.put_nowait(None)

        self.heartbeat_streams += 1
        reader = asyncio.create_task(read(), name="heartbeat-reader")
        self._closers.add(reader.cancel)
        try:
            while (item := await pending.get()) is not None:
                seq, beat, fut, span = item
                try:
                    if fut is None:
                        result = self._buffer(beat)
                    else:
                        try:
                            result = await fut
                        except Unavailable:
                            # Redis went down while it waited, or its deadline passed:
                            # keep it (replayed in order); every request gets its answer.
                            result = self._buffer(beat)
                except RegistryError as exc:
                    await context.abort(status_of(exc), str(exc))
                in_flight.release()
                self.heartbeat_acks[result.outcome] += 1
                if span is not None:
                    span.set_attribute("registry.heartbeat.outcome", result.outcome.name)
                    span.end()
                yield _heartbeat_response(
                    seq, result, self._s.heartbeat_interval_ms, self._bp.factor
                )
            if failure:
                await context.abort(status_of(failure[0]), str(failure[0]))
            if self._closing:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            self._closers.discard(reader.cancel)
            self.heartbeat_streams -= 1
            for node_id in streamed:
                self._streamed[node_id] -= 1
                if self._streamed[node_id] <= 0:
                    del self._streamed[node_id]
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None and left[2] is not None:
                    left[2].cancel()
                if left is not None and left[3] is not None:
                    left[3].end()

    def _buffer(self, beat: HeartbeatIn) -> HeartbeatResult:
        """Degraded: keep the heartbeat for replay and acknowledge it as BUFFERED."""
        self._deg.buffer.add_heartbeat(beat)
        node = self._replica.get(beat.node_id)
        return HeartbeatResult(
            outcome=HeartbeatOutcome.BUFFERED,
            version=node.version if node is not None else 0,
            status=node.status if node is not None else None,
            ttl_ms=node.ttl_ms if node is not None else 0,
        )

    def _decode_heartbeat(self, req: pb.HeartbeatRequest) -> HeartbeatIn:
        validation.check_id("node_id", req.node_id)
        metrics = validation.check_metrics("metrics", convert.metrics_from_pb(req.metrics))
        if req.report_jobs:
            jobs = validation.check_job_ids("running_job_ids", req.running_job_ids)
            return HeartbeatIn(req.node_id, metrics, jobs)
        if req.running_job_ids:
            raise InvalidArgument("report_jobs", "must be true when running_job_ids is set")
        return HeartbeatIn(req.node_id, metrics)

    @_mapped
    async def DeregisterNode(
        self, request: pb.DeregisterNodeRequest, context: Context
    ) -> pb.DeregisterNodeResponse:
        node_id = validation.check_id("node_id", request.node_id)
        done = await self._deg.write(Deregister(node_id))
        if done is None:  # buffered while degraded
            known = self._replica.get(node_id) is not None
            return pb.DeregisterNodeResponse(existed=known, version=self._replica.version)
        existed, version = done
        if existed:
            self._replica.apply_local(None, node_id, version)
        return pb.DeregisterNodeResponse(existed=existed, version=version)

    @_mapped
    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: Context
    ) -> pb.DrainNodeResponse:
        node_id = validation.check_id("node_id", request.node_id)
        known = self._replica.get(node_id)
        if self._deg.degraded and known is None:
            raise NotFound(f"node {node_id!r} is not registered (as far as this sidecar knows)")
        done = await self._deg.write(Drain(node_id))
        if done is None:  # buffered while degraded
            if known is None:
                raise NotFound(f"node {node_id!r} is not registered")
            return pb.DrainNodeResponse(
                node=convert.node_to_pb(replace(known, status=NodeStatus.DRAINING))
            )
        node, _ = done
        self._replica.apply_local(node, node_id, node.version)
        return pb.DrainNodeResponse(node=convert.node_to_pb(node))

    @_mapped
    async def ReserveSlot(
        self, request: pb.ReserveSlotRequest, context: Context
    ) -> pb.ReserveSlotResponse:
        node_id = validation.check_id("node_id", request.node_id)
        job_id = validation.check_id("job_id", request.job_id)
        s = self._s
        lease = validation.check_ttl(
            "lease_ms", request.lease_ms, s.default_lease_ms, 1, s.max_lease_ms
        )
        try:
            await self._deg.ordered((f"node:{node_id}", f"job:{job_id}"))
            res = await self._deg.slots("ReserveSlot").reserve(node_id, job_id, lease)
        except RegistryError as exc:
            self._count_failed_reservation("ReserveSlot", exc)
            raise
        self._granted("ReserveSlot", res)
        return pb.ReserveSlotResponse(
            node=convert.node_to_pb(res.node),
            created=res.created,
            lease_deadline_ms=res.lease_deadline_ms,
            buffered=res.buffered,
        )

    @_mapped
    async def ReleaseSlot(
        self, request: pb.ReleaseSlotRequest, context: Context
    ) -> pb.ReleaseSlotResponse:
        node_id = validation.check_id("node_id", request.node_id)
        job_id = validation.check_id("job_id", request.job_id)
        rel = await self._deg.write(ReleaseSlot(node_id, job_id))
        if rel is None:  # buffered while degraded: accepted, applied on recovery
            self._deg.local.release(node_id, job_id)
            known = self._replica.get(node_id)
            if known is None:
                return pb.ReleaseSlotResponse(released=True)
            return pb.ReleaseSlotResponse(released=True, node=convert.node_to_pb(known))
        if rel.node is None:
            return pb.ReleaseSlotResponse(released=rel.released)
        self._replica.apply_local(rel.node, node_id, rel.node.version)
        return pb.ReleaseSlotResponse(released=rel.released, node=convert.node_to_pb(rel.node))

    # --- reads ------------------------------------------------------------------------

    @_mapped
    async def GetNode(self, request: pb.GetNodeRequest, context: Context) -> pb.GetNodeResponse:
        node_id = validation.check_id("node_id", request.node_id)
        self._require_ready()
        node = await self._tiers.lookup(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered")
        return pb.GetNodeResponse(node=convert.node_to_pb(node), freshness=self._freshness())

    @_mapped
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: Context
    ) -> pb.ListNodesResponse:
        f = convert.filter_from_pb(request)
        validation.check_optional_id("pool_id", f.pool_id)
        if f.lang_pair is not None:
            validation.check_lang_pair("lang_pair", f.lang_pair)
        validation.check_labels("labels", f.labels)
        self._require_ready()
        nodes = list_nodes(self._replica, f)
        return pb.ListNodesResponse(
            nodes=[convert.node_to_pb(n) for n in nodes], freshness=self._freshness()
        )

    @_mapped
    async def SelectNodes(
        self, request: pb.SelectNodesRequest, context: Context
    ) -> pb.SelectNodesResponse:
        if request.count < 0:
            raise InvalidArgument("count", "must not be negative")
        sel = validation.check_selector(convert.selector_from_pb(request))
        self._require_ready()
        result = select(self._replica, sel, defaults=self._weights)
        if not result.nodes:
            self.empty_selections["SelectNodes"] += 1
        return pb.SelectNodesResponse(
            nodes=[convert.node_to_pb(n) for n in result.nodes],
            breakdown=convert.breakdown_to_pb(result.breakdown),
            freshness=self._freshness(),
        )

    @_mapped_stream
    async def Watch(
        self, request: pb.WatchRequest, context: Context
    ) -> AsyncIterator[pb.WatchEvent]:
        pool_id = validation.check_optional_id("pool_id", request.pool_id)
        since = self._parse_token(request.resume_token) if request.resume_token else None
        self._require_ready()
        replica = self._replica
        # No await between subscribing and reading the start state: nothing slips between.
        sub = replica.subscribe(pool_id)
        close = functools.partial(replica.end, sub)
        self._closers.add(close)
        floor = replica.version
        try:
            backlog: list[Change] | None = None
            if since is not None:
                backlog = replica.history_after(since, pool_id)
                if backlog is None and since < floor:
                    backlog = await self._log_backlog(since, floor, pool_id)
            if backlog is None:
                floor = replica.version
                nodes = list(replica.snapshot(pool_id))
                for node in nodes:
                    yield pb.WatchEvent(
                        type=pb.WATCH_EVENT_TYPE_SNAPSHOT,
                        node=convert.node_to_pb(node),
                        node_id=node.node_id,
                        version=node.version,
                    )
                yield pb.WatchEvent(
                    type=pb.WATCH_EVENT_TYPE_SNAPSHOT_END,
                    version=floor,
                    resume_token=self._token(floor),
                )
            else:
                for change in backlog:
                    yield convert.change_to_pb(change, self._token(change.version))
            async for event in self._live(sub, floor, pool_id):
                yield event
        finally:
            self._closers.discard(close)
            replica.unsubscribe(sub)

    async def _log_backlog(self, since: int, until: int, pool_id: str) -> list[Change] | None:
        """Changes (since, until] from the Redis log, when the in-memory history is too
        short but the log still covers the token; None when it does not (or Redis is
        unreachable): then the watcher gets a snapshot.

        With a pool filter, the pools a node had before each change are not in the log,
        so a change leaving a node outside the pool is sent as a DELETE even if the
        watcher never had that node (a DELETE of an unknown id is a no-op for it).
        """
        out: list[Change] = []
        position = since
        try:
            while position < until:
                read = await self._gateway.log.read(position, 1000)
                for change in read.changes:
                    if change.version > until:
                        break
                    if change.version != position + 1:
                        return None
                    position = change.version
                    if change.type is EventType.POOL:
                        continue
                    seen = for_pool(change, frozenset({pool_id}), pool_id)
                    if seen is not None:
                        out.append(seen)
                if not read.changes:
                    return None
        except Unavailable:
            return None
        return out

    async def _live(self, sub: Any, floor: int, pool_id: str) -> AsyncIterator[pb.WatchEvent]:
        """Queued changes after ``floor``; a BOOKMARK whenever the stream goes quiet."""
        bookmark_s = self._s.watch_bookmark_ms / 1000
        untokened = False
        while True:
            try:
                change = await asyncio.wait_for(sub.queue.get(), timeout=bookmark_s)
            except TimeoutError:
                change = False
            if change is None:
                if self._closing:
                    raise Unavailable(SHUTTING_DOWN)
                raise ResourceExhausted("watcher fell too far behind; resume with the last token")
            if change is False or (untokened and sub.queue.empty()):
                untokened = False
                version = self._replica.version
                yield pb.WatchEvent(
                    type=pb.WATCH_EVENT_TYPE_BOOKMARK,
                    version=version,
                    resume_token=self._token(version),
                )
                if change is False:
                    continue
            assert isinstance(change, Change)
            if change.version <= floor:
                continue
            # Several changes at one version come from a reload: no token until all are sent.
            shared = not sub.queue.empty() and _peek_version(sub) == change.version
            untokened = untokened or shared
            token = "" if untokened else self._token(change.version)
            yield convert.change_to_pb(change, token)
            if untokened and sub.queue.empty():
                untokened = False
                yield pb.WatchEvent(
                    type=pb.WATCH_EVENT_TYPE_BOOKMARK,
                    version=change.version,
                    resume_token=self._token(change.version),
                )

    # --- scheduling and pools --------------------------------------------------------

    @_mapped
    async def Schedule(self, request: pb.ScheduleRequest, context: Context) -> pb.ScheduleResponse:
        if request.selector.count < 0:
            raise InvalidArgument("selector.count", "must not be negative")
        sel = validation.check_selector(convert.selector_from_pb(request.selector), "selector")
        job_id = validation.check_id("job_id", request.job_id)
        s = self._s
        lease = validation.check_ttl(
            "lease_ms", request.lease_ms, s.default_lease_ms, 1, s.max_lease_ms
        )
        self._require_ready()
        try:
            await self._deg.ordered((f"job:{job_id}",))
            done = await schedule(
                self._deg.slots("Schedule"),
                self._replica,
                sel,
                job_id,
                lease,
                attempts=s.schedule_attempts,
                weights=self._weights,
            )
        except RegistryError as exc:
            self._count_failed_reservation("Schedule", exc)
            raise
        res = done.reservation
        self._granted("Schedule", res)
        return pb.ScheduleResponse(
            node=convert.node_to_pb(res.node),
            breakdown=convert.breakdown_to_pb(done.breakdown),
            lease_deadline_ms=res.lease_deadline_ms,
            attempts=done.attempts,
            created=res.created,
            buffered=res.buffered,
        )

    def _granted(self, rpc: str, res: Reservation) -> None:
        """Count a granted slot; one Redis granted also goes into the replica at once (a
        local grant does not: the replica holds what Redis has)."""
        outcome = "created" if res.created else "renewed"
        self.reservations[(rpc, f"local_{outcome}" if res.buffered else outcome)] += 1
        if not res.buffered:
            self._replica.apply_local(res.node, res.node.node_id, res.node.version)

    def _count_failed_reservation(self, rpc: str, exc: RegistryError) -> None:
        outcome = next(
            (RESERVE_OUTCOMES[k] for k in type(exc).__mro__ if k in RESERVE_OUTCOMES), "error"
        )
        if self._deg.degraded and isinstance(exc, Unavailable):
            outcome = "refused_degraded"
        if rpc == "Schedule" and isinstance(exc, ResourceExhausted):
            outcome = "no_candidate"
            self.empty_selections[rpc] += 1
        self.reservations[(rpc, outcome)] += 1

    @_mapped
    async def PutPool(self, request: pb.PutPoolRequest, context: Context) -> pb.PutPoolResponse:
        if not request.HasField("pool"):
            raise InvalidArgument("pool", "is required")
        pool = validation.check_pool(convert.pool_from_pb(request.pool))
        done = await self._deg.write(PutPool(pool))
        if done is None:  # buffered while degraded
            return pb.PutPoolResponse(pool=convert.pool_to_pb(pool))
        stored, _ = done
        self._replica.apply_local_pool(stored)
        return pb.PutPoolResponse(pool=convert.pool_to_pb(stored))

    @_mapped
    async def GetPool(self, request: pb.GetPoolRequest, context: Context) -> pb.GetPoolResponse:
        pool_id = validation.check_id("pool_id", request.pool_id)
        self._require_ready()
        pool = self._replica.pools.get(pool_id)
        if pool is None:
            raise NotFound(f"pool {pool_id!r} is not configured")
        return pb.GetPoolResponse(pool=convert.pool_to_pb(pool))

    @_mapped
    async def ListPools(
        self, request: pb.ListPoolsRequest, context: Context
    ) -> pb.ListPoolsResponse:
        self._require_ready()
        pools = sorted(self._replica.pools.values(), key=lambda p: p.pool_id)
        return pb.ListPoolsResponse(pools=[convert.pool_to_pb(p) for p in pools])

    @_mapped
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        r = self._replica
        lat = self._gateway.latency
        return pb.GetStatusResponse(
            mode=self._deg.mode.value,
            version=r.version,
            node_count=len(r),
            # The checker's last answer (it can go down: Redis lost data); the feed's
            # figure before the first check.
            redis_version=self._checker.redis_version or self._feed.redis_version,
            staleness_ms=max(r.staleness_ms(), 0),
            ready=r.ready,
            epoch=self._gateway.epoch,
            namespace=self._s.namespace,
            uptime_ms=int((time.monotonic() - self._started) * 1000),
            events_applied=r.events_applied,
            reloads=r.reloads,
            watchers=r.watchers,
            heartbeat_streams=self.heartbeat_streams,
            redis_latency_p50_us=int(lat.percentile(0.5) * 1e6),
            redis_latency_p99_us=int(lat.percentile(0.99) * 1e6),
            pool_count=len(r.pools),
            lag_versions=self._checker.lag_versions,
            lag_ms=self._checker.lag_ms,
            version_checks=self._checker.checks,
            version_check_timeouts=self._checker.timeouts,
            catchups=self._checker.catchups,
            repairs=r.repairs,
            revalidated=self._tiers.revalidated,
            drift=self._tiers.drift,
            miss_markers=len(r.misses),
            buffered_heartbeats=len(self._deg.buffer.heartbeats),
            buffered_writes=len(self._deg.buffer.ops),
            mode_transitions=sum(self._deg.transitions.values()),
            degraded_ms=self._deg.degraded_ms,
            outages=self._deg.outages,
            last_outage_ms=self._deg.last_outage_ms,
            rebuilds=self._deg.rebuilds,
            buffer_refused=self._deg.buffer.refused,
        )


async def _abort(context: Context, exc: RegistryError) -> None:
    """End the call with the error's status; a failed Schedule also carries its
    SelectionBreakdown as a google.rpc.Status detail, so callers see why."""
    code = status_of(exc)
    breakdown = getattr(exc, "breakdown", None)
    if breakdown is None:
        await context.abort(code, str(exc))
    detail = any_pb2.Any()
    detail.Pack(convert.breakdown_to_pb(breakdown))
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(exc), details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


def _pending_node(
    spec: NodeSpec, ttl_ms: int, known: Node | None, weights: SelectionWeights
) -> Node:
    """What a registration buffered while degraded will store, as far as this sidecar can
    tell: the declared fields from the request, the live ones from the replica."""
    status = known.status if known is not None else NodeStatus.ONLINE
    if status is NodeStatus.OFFLINE:
        status = NodeStatus.ONLINE
    if spec.metrics is not None:
        metrics, health = spec.metrics, health_score(spec.metrics, weights)
    elif known is not None:
        metrics, health = known.metrics, known.health_score
    else:
        metrics, health = Metrics(), 1.0
    return Node(
        node_id=spec.node_id,
        address=spec.address,
        pools=frozenset(spec.pools),
        lang_pairs=frozenset(spec.lang_pairs),
        services=spec.services,
        labels=dict(spec.labels),
        capacity=spec.capacity,
        status=status,
        metrics=metrics,
        running_jobs=known.running_jobs if known is not None else 0,
        health_score=health,
        version=known.version if known is not None else 0,
        registered_at=known.registered_at if known is not None else 0,
        last_heartbeat_at=known.last_heartbeat_at if known is not None else 0,
        ttl_ms=ttl_ms,
    )


def _heartbeat_response(
    seq: int, result: HeartbeatResult, default_interval: int, stretch: float
) -> pb.HeartbeatResponse:
    """The suggested interval is a third of the node's own TTL, so two may be lost, times
    the backpressure stretch (registry/backpressure.py)."""
    interval = int((result.ttl_ms // 3 if result.ttl_ms else default_interval) * stretch)
    if result.outcome is HeartbeatOutcome.BUFFERED:
        return pb.HeartbeatResponse(
            seq=seq,
            version=result.version,
            status=convert.status_to_pb(result.status),
            action=pb.HEARTBEAT_ACTION_BUFFERED,
            interval_ms=interval,
        )
    if result.outcome is not HeartbeatOutcome.OK:
        return pb.HeartbeatResponse(
            seq=seq,
            version=result.version,
            status=convert.status_to_pb(result.status),
            action=pb.HEARTBEAT_ACTION_REGISTER,
            interval_ms=interval,
        )
    return pb.HeartbeatResponse(
        seq=seq,
        version=result.version,
        status=convert.status_to_pb(result.status),
        action=pb.HEARTBEAT_ACTION_CONTINUE,
        deadline_ms=result.deadline_ms,
        interval_ms=interval,
        released_job_ids=result.released_job_ids,
    )


def _peek_version(sub: Any) -> int:
    head = sub.queue._queue[0]  # asyncio.Queue keeps its items in a deque
    return head.version if isinstance(head, Change) else -1
