"""Metrics: OpenTelemetry instruments, a Prometheus ``/metrics`` endpoint, OTLP push.

Cheap on the hot path by construction. What the sidecar already counts for GetStatus
(cache lookups, version checks, buffered writes, heartbeat acks...) is a plain integer
bumped where it happens; the instruments here are *observable* and read those integers
only when a reader collects (a scrape, an OTLP export). Only two histograms are
recorded as things happen: one per RPC (``rpc.server.call.duration``, from a server
interceptor) and one per Redis operation (``db.client.operation.duration``; a batch of
heartbeats is one operation). A record took about 10 us in a one-off timeit loop, so
neither is per heartbeat.

Off unless ``metrics_listen`` or ``metrics_exporter`` is set: then no provider, no
interceptor, no recorder, nothing to pay. Names follow the OpenTelemetry semantic
conventions where one exists (``rpc.*``, ``db.client.*``); the rest are ``registry.*``.
docs/operations.md lists every series with the alert we would set on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from registry.config import Settings
from registry.model import HeartbeatOutcome

if TYPE_CHECKING:
    # The SDK is imported only when metrics are on: it costs ~50 ms and several MiB.
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

    from registry.backpressure import Backpressure
    from registry.cache import Replica
    from registry.degradation import Degradation
    from registry.gateway import Gateway
    from registry.heap import Heap
    from registry.servicer import RegistryServicer
    from registry.supervisor import Supervisor
    from registry.tiers import Tiers
    from registry.versions import VersionChecker

log = logging.getLogger(__name__)

K = TypeVar("K")

METER = "registry"
SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Histogram bounds for a sidecar whose calls take 0.1 to 10 ms (the default OTel bounds
are for milliseconds: every call here would land in the first bucket)."""

TIERS = {
    "l1": ("l1", "hit"),
    "l2": ("l2", "hit"),
    "redis": ("redis", "read_through"),
    "miss_marker": ("miss_marker", "hit"),
    "miss": ("replica", "miss"),
}
"""Tiers' lookup counters -> (tier, result) attributes of ``registry.cache.lookups``."""

# Label values reported as 0 before they first happen, so a dashboard or an alert sees a
# series from the start (Prometheus cannot rate() a series that does not exist yet).
TRANSITIONS = (
    ("NORMAL", "L2_ONLY"),
    ("L2_ONLY", "LOCAL_ONLY"),
    ("L2_ONLY", "NORMAL"),
    ("LOCAL_ONLY", "NORMAL"),
)
BUFFERED_KINDS = (
    "heartbeat", "register", "deregister", "drain", "release", "put_pool", "reserve"
)  # fmt: skip
RESERVATIONS = tuple(
    (rpc, outcome)
    for rpc, full in (("ReserveSlot", "full"), ("Schedule", "no_candidate"))
    for outcome in (
        "created",
        "renewed",
        full,
        "refused_degraded",
        "local_created",
        "local_renewed",
    )
)
SELECTIONS = ("SelectNodes", "Schedule")
LOCAL_SLOTS = ("granted", "renewed", "replayed", "dropped")


def resource() -> Resource:
    """``service.name`` defaults to ``registry-sidecar``; ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK) override it."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": "registry-sidecar"})


@dataclass(frozen=True)
class Parts:
    """The running sidecar's pieces the callbacks read."""

    gateway: Gateway
    replica: Replica
    checker: VersionChecker
    tiers: Tiers
    degradation: Degradation
    servicer: RegistryServicer
    backpressure: Backpressure
    supervisor: Supervisor
    heap: Heap


class Metrics:
    """One sidecar's metrics. ``start(parts)`` once the pieces exist; ``shutdown()`` at
    the end. ``address`` is the ``/metrics`` endpoint actually bound (port 0 allowed)."""

    def __init__(self, settings: Settings, readers: Iterable[MetricReader] = ()) -> None:
        self._settings = settings
        self._readers = list(readers)
        self._server: WSGIServer | None = None
        self._provider: MeterProvider | None = None
        self.address = ""
        self._rpc_duration: Any = None
        self._redis_duration: Any = None
        if settings.metrics_listen:
            self._readers.append(self._prometheus(settings.metrics_listen))
        if settings.metrics_exporter:
            from opentelemetry.sdk.metrics.export import (
                ConsoleMetricExporter,
                MetricExporter,
                PeriodicExportingMetricReader,
            )

            exporter: MetricExporter
            if settings.metrics_exporter == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter,
                )

                exporter = OTLPMetricExporter()
            else:
                exporter = ConsoleMetricExporter()
            self._readers.append(PeriodicExportingMetricReader(exporter))

    @property
    def enabled(self) -> bool:
        return bool(self._readers)

    def _prometheus(self, listen: str) -> MetricReader:
        """A reader on a registry of our own (not prometheus_client's global one, so
        several sidecars in one process keep apart), served by prometheus_client's
        HTTP server in a thread: the callbacks it runs only read integers."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self._server, _thread = start_http_server(int(port), host, registry=registry)
        bound = self._server.server_port
        self.address = f"{host}:{bound}"
        log.info("metrics at http://%s/metrics", self.address)
        return reader

    # --- wiring -----------------------------------------------------------------------

    def start(self, parts: Parts) -> None:
        if not self._readers:
            return
        from opentelemetry.sdk.metrics import MeterProvider

        self._provider = MeterProvider(metric_readers=self._readers, resource=resource())
        meter = self._provider.get_meter(METER)
        self._rpc_duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of RPCs handled, by method and status code (a stream's "
            "whole life for Heartbeat and Watch).",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._redis_duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of Redis operations (a script call, a pipelined read).",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        parts.gateway.recorder = self._record_redis
        _observe(meter, parts)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        return [_RpcTimer(self)] if self._readers else []

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._provider is not None:
            self._provider.shutdown(timeout_millis=2_000)
            self._provider = None

    # --- recording --------------------------------------------------------------------

    def _record_redis(self, operation: str, seconds: float, exc: BaseException | None) -> None:
        attrs = {"db.system.name": "redis", "db.operation.name": operation}
        if exc is not None:
            attrs["error.type"] = type(exc).__name__
        self._redis_duration.record(seconds, attrs)

    def record_rpc(self, method: str, seconds: float, code: grpc.StatusCode) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self._rpc_duration.record(
            seconds,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code.value[0],
            },
        )


class _RpcTimer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Times every RPC, unary or streaming, with the status it ended with."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # Typed as Any: grpc-stubs types handlers for the sync server, not grpc.aio's.
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        kind = next(k for k in _FACTORIES if getattr(handler, k) is not None)
        inner = getattr(handler, kind)
        record = self._metrics.record_rpc

        async def unary(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            try:
                return await inner(request, context)
            finally:
                record(method, time.perf_counter() - start, _code(context))

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                record(method, time.perf_counter() - start, _code(context))

        return _FACTORIES[kind](
            unary if kind.endswith("unary") else stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_FACTORIES: dict[str, Callable[..., Any]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
"""Handler kind (the attribute of grpc.RpcMethodHandler that is set) -> its factory."""


def _code(context: Any) -> grpc.StatusCode:
    """The status the handler set or aborted with; OK when it set none. (An exception
    that escaped a handler shows as OK here and UNKNOWN to the caller; ours map every
    domain error to a status, so that would be a bug, and the logs say so.)"""
    code: Any = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


# --- observable instruments: read what the sidecar already counts --------------------


def _observe(meter: Meter, p: Parts) -> None:
    def counter(name: str, unit: str, description: str, read: Callable[[], Iterator[Any]]) -> None:
        meter.create_observable_counter(name, [_callback(read)], unit=unit, description=description)

    def gauge(name: str, unit: str, description: str, read: Callable[[], Iterator[Any]]) -> None:
        meter.create_observable_gauge(name, [_callback(read)], unit=unit, description=description)

    def one(value: Callable[[], float]) -> Callable[[], Iterator[Any]]:
        def read() -> Iterator[Any]:
            yield value(), {}

        return read

    r, deg, svc = p.replica, p.degradation, p.servicer

    def lookups() -> Iterator[Any]:
        for key, count in dict(p.tiers.lookups).items():
            tier, result = TIERS.get(key, (key, "hit"))
            yield count, {"tier": tier, "result": result}

    counter(
        "registry.cache.lookups",
        "{lookup}",
        "Node lookups by the tier that answered: l1 (fresh in the replica), l2 (older, "
        "being revalidated), redis (read through), miss_marker (a remembered miss), "
        "replica/miss (the replica is complete and lacks it).",
        lookups,
    )
    counter(
        "registry.version_check.runs",
        "{check}",
        "Version checks run.",
        one(lambda: p.checker.checks),
    )
    counter(
        "registry.version_check.timeouts",
        "{check}",
        "Version checks that failed or did not answer within their timeout.",
        one(lambda: p.checker.timeouts),
    )
    counter(
        "registry.version_check.catchups",
        "{catchup}",
        "Catch-ups the version checker started because the change feed was late.",
        one(lambda: p.checker.catchups),
    )
    counter(
        "registry.replica.events_applied",
        "{event}",
        "Change-log entries applied to the replica.",
        one(lambda: r.events_applied),
    )
    counter(
        "registry.replica.reloads",
        "{reload}",
        "Full reloads of the replica.",
        one(lambda: r.reloads),
    )
    counter(
        "registry.replica.repairs",
        "{repair}",
        "Repairs: the log lost entries, only the changed nodes were fetched.",
        one(lambda: r.repairs),
    )
    counter(
        "registry.replica.revalidated",
        "{entry}",
        "Entries revalidated against Redis after their L1 TTL.",
        one(lambda: p.tiers.revalidated),
    )
    counter(
        "registry.replica.drift",
        "{entry}",
        "Revalidated entries that disagreed with Redis (expected: 0).",
        one(lambda: p.tiers.drift),
    )

    def transitions() -> Iterator[Any]:
        for (old, new), count in _seeded(deg.transitions, TRANSITIONS):
            yield count, {"from": old, "to": new}

    counter(
        "registry.degradation.transitions",
        "{transition}",
        "Mode changes, by from and to mode.",
        transitions,
    )
    counter(
        "registry.degradation.outages", "{outage}", "Degraded periods.", one(lambda: deg.outages)
    )
    counter(
        "registry.degradation.rebuilds",
        "{rebuild}",
        "Times Redis had lost the registry and this sidecar rebuilt it.",
        one(lambda: deg.rebuilds),
    )

    def buffered() -> Iterator[Any]:
        for kind, count in _seeded(deg.buffer.accepted, BUFFERED_KINDS):
            yield count, {"kind": kind}

    counter(
        "registry.writes.buffered",
        "{write}",
        "Writes acknowledged while degraded and kept for replay, by kind.",
        buffered,
    )
    counter(
        "registry.writes.refused",
        "{write}",
        "Writes refused because the degraded-mode buffer was full.",
        one(lambda: deg.buffer.refused),
    )
    counter(
        "registry.heartbeats.received",
        "{heartbeat}",
        "Heartbeats received on streams.",
        one(lambda: svc.heartbeats_received),
    )

    def acks() -> Iterator[Any]:
        for outcome, count in _seeded(svc.heartbeat_acks, tuple(HeartbeatOutcome)):
            yield count, {"outcome": outcome.name.lower()}

    counter(
        "registry.heartbeats.acknowledged",
        "{heartbeat}",
        "Heartbeats answered, by outcome: ok, buffered (degraded), unknown (re-register), offline.",
        acks,
    )

    def reservations() -> Iterator[Any]:
        for (rpc, outcome), count in _seeded(svc.reservations, RESERVATIONS):
            yield count, {"rpc.method": rpc, "outcome": outcome}

    counter(
        "registry.reservations",
        "{reservation}",
        "ReserveSlot and Schedule calls by outcome: created, renewed, full, not_found, "
        "not_online, held_elsewhere, no_candidate (Schedule), refused_degraded, unavailable, "
        "local_created / local_renewed (granted while degraded, policy local), and error "
        "(anything else).",
        reservations,
    )

    def local_slots() -> Iterator[Any]:
        for outcome, count in _seeded(deg.local.counts, LOCAL_SLOTS):
            yield count, {"outcome": outcome}

    counter(
        "registry.local_slots",
        "{reservation}",
        "Reservation policy local: slots granted (or renewed) from the local view while "
        "degraded, and on recovery replayed to Redis or dropped (the job held a slot "
        "elsewhere, or the node was gone).",
        local_slots,
    )

    def empty() -> Iterator[Any]:
        for rpc, count in _seeded(svc.empty_selections, SELECTIONS):
            yield count, {"rpc.method": rpc}

    counter(
        "registry.selections.empty",
        "{selection}",
        "SelectNodes answers with no node, and Schedules with no candidate that had room.",
        empty,
    )

    def mode() -> Iterator[Any]:
        current = deg.observed_mode.value
        for name in ("NORMAL", "L2_ONLY", "LOCAL_ONLY"):
            yield int(name == current), {"mode": name}

    gauge("registry.degradation.mode", "1", "1 for the current mode, 0 for the others.", mode)
    gauge(
        "registry.changefeed.lag.versions",
        "{version}",
        "Versions the replica was behind Redis at the last version check.",
        one(lambda: p.checker.lag_versions),
    )
    gauge(
        "registry.changefeed.lag.duration",
        "s",
        "How long the replica has been behind Redis (0 when in step).",
        one(lambda: p.checker.lag_ms / 1000),
    )
    gauge(
        "registry.replica.staleness",
        "s",
        "Age of the replica's last confirmation from Redis (Freshness.staleness_ms).",
        one(lambda: max(r.staleness_ms(), 0) / 1000),
    )
    gauge("registry.replica.nodes", "{node}", "Nodes in the replica.", one(lambda: len(r)))
    gauge(
        "registry.replica.version",
        "{version}",
        "Version the replica applied.",
        one(lambda: r.version),
    )

    def buffer_size() -> Iterator[Any]:
        yield len(deg.buffer.ops), {"kind": "ops"}
        yield len(deg.buffer.heartbeats), {"kind": "heartbeats"}

    gauge(
        "registry.writes.buffer.size",
        "{write}",
        "Writes waiting for replay: ops (ordered) and heartbeats (latest per node).",
        buffer_size,
    )
    gauge("registry.watch.streams", "{stream}", "Open Watch streams.", one(lambda: r.watchers))
    gauge(
        "registry.heartbeat.streams",
        "{stream}",
        "Open Heartbeat streams.",
        one(lambda: svc.heartbeat_streams),
    )

    def connections() -> Iterator[Any]:
        for pool_name, client in (("hot", p.gateway.redis), ("bulk", p.gateway.bulk)):
            pool = client.connection_pool
            used = len(getattr(pool, "_in_use_connections", ()))
            idle = len(getattr(pool, "_available_connections", ()))
            yield (
                used,
                {"db.client.connection.pool.name": pool_name, "db.client.connection.state": "used"},
            )
            yield (
                idle,
                {"db.client.connection.pool.name": pool_name, "db.client.connection.state": "idle"},
            )

    gauge(
        "db.client.connection.count",
        "{connection}",
        "Redis connections of the hot (writes, checks) and bulk (reloads) pools.",
        connections,
    )

    def loop_lag() -> Iterator[Any]:
        lags = list(deg.loop_lags)
        yield (max(lags) if lags else 0.0), {}

    def supervised(attr: str) -> Callable[[], Iterator[Any]]:
        def read() -> Iterator[Any]:
            for state in p.supervisor.snapshot():
                yield getattr(state, attr), {"part": state.name}

        return read

    counter(
        "registry.supervisor.failures",
        "{failure}",
        "Unexpected exceptions of background parts (each logged at ERROR and restarted), by part.",
        supervised("failures"),
    )
    counter(
        "registry.supervisor.restarts",
        "{restart}",
        "Restarts of background parts, by part.",
        supervised("restarts"),
    )
    gauge(
        "registry.supervisor.healthy",
        "1",
        "0 while a background part keeps failing (gRPC health is NOT_SERVING then).",
        one(lambda: int(p.supervisor.healthy)),
    )
    bp = p.backpressure
    gauge(
        "registry.heartbeat.interval_factor",
        "1",
        "How much the heartbeat interval suggested to nodes is stretched (1: not at all; "
        "backpressure, see docs/reliability.md).",
        one(lambda: bp.factor),
    )
    gauge(
        "registry.heartbeat.queue",
        "{heartbeat}",
        "Heartbeats waiting for a batch to Redis (the ingest queue).",
        one(lambda: p.gateway.heartbeats_queued),
    )
    counter(
        "registry.heartbeat.queue_full",
        "{wait}",
        "Times a stream's reader waited because the ingest queue was at its bound.",
        one(lambda: bp.waits),
    )
    counter(
        "registry.writes.superseded",
        "{heartbeat}",
        "Buffered heartbeats dropped, not replayed, because a newer one reached Redis.",
        one(lambda: deg.buffer.superseded),
    )

    def detector_trips() -> Iterator[Any]:
        d = deg.detector
        yield (d.silences if d else 0), {"cause": "silence"}
        yield (d.errors if d else 0), {"cause": "connection"}
        yield (d.vetoed if d else 0), {"cause": "vetoed_busy"}

    counter(
        "registry.detector.verdicts",
        "{verdict}",
        "Failure detector verdicts: down for silence, down for a failed connection, and "
        "PINGs past the threshold that did not trip because Redis answered elsewhere (busy).",
        detector_trips,
    )
    gauge(
        "registry.detector.threshold",
        "s",
        "The failure detector's current silence threshold (adapts to PING round trips).",
        one(lambda: deg.detector.threshold_s if deg.detector else 0.0),
    )

    gauge(
        "registry.gc.pause",
        "s",
        "Longest full garbage collection of the last minute (the loop and the failure "
        "detector's thread stand still meanwhile).",
        one(lambda: p.heap.longest_pause()),
    )
    gauge(
        "registry.event_loop.lag",
        "s",
        "Longest delay of the event loop's 5 ms ticker over the last second.",
        loop_lag,
    )


def _seeded(counts: Mapping[K, int], known: Iterable[K]) -> list[tuple[K, int]]:
    """The counts (a copy: the loop may add a key while a scrape reads), with 0 for
    the known keys that have not happened yet."""
    out = dict.fromkeys(known, 0)
    out.update(dict(counts))
    return list(out.items())


def _callback(
    read: Callable[[], Iterator[Any]],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        try:
            return [Observation(value, attrs) for value, attrs in read()]
        except Exception:  # a racing change while a scrape reads: skip this one
            log.debug("metric callback failed", exc_info=True)
            return []

    return callback
