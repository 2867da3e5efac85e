"""The sidecar process: gRPC server, health, reflection, background loops, shutdown.

Start order: listen first (health NOT_SERVING, reads answer UNAVAILABLE), preload the
replica, then report SERVING. Stop order: NOT_SERVING, let RPCs finish within the grace
period, then stop the loops and close Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from registry.backpressure import Backpressure, Limits
from registry.cache import Replica
from registry.changefeed import ChangeFeed
from registry.config import Settings
from registry.degradation import Degradation, Journal, Thresholds
from registry.embedded_redis import EmbeddedRedis
from registry.errors import Unavailable
from registry.gateway import Gateway
from registry.heap import Heap
from registry.metrics import Metrics, Parts
from registry.servicer import RegistryServicer
from registry.supervisor import Supervisor
from registry.tiers import Tiers
from registry.tracing import Tracing, background
from registry.versions import VersionChecker
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


class Sidecar:
    """One running sidecar. ``async with Sidecar(settings) as sc`` serves at ``sc.address``."""

    def __init__(
        self,
        settings: Settings,
        *,
        metric_readers: Iterable[MetricReader] = (),
        span_exporter: SpanExporter | None = None,
    ) -> None:
        """``metric_readers`` and ``span_exporter`` add to what the settings configure
        (tests read metrics and spans in memory through them)."""
        self.settings = settings
        self._metric_readers = list(metric_readers)
        self._span_exporter = span_exporter
        self.metrics: Metrics | None = None
        self._tracing: Tracing | None = None
        self.port = 0
        self._embedded: EmbeddedRedis | None = None
        self._gateway: Gateway | None = None
        self._feed: ChangeFeed | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self.supervisor = Supervisor(self._on_health)
        """Runs every background part (started once the replica is preloaded)."""
        self.heap = Heap()
        self._serving = False
        self._journal: Journal | None = None
        self.replica = Replica(
            history=settings.watch_history,
            watch_queue_max=settings.watch_queue_max,
            l1_s=settings.l1_ttl_ms / 1000,
        )
        self._checker: VersionChecker | None = None
        self._degradation: Degradation | None = None
        self._tiers: Tiers | None = None
        self.servicer: RegistryServicer | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def gateway(self) -> Gateway:
        assert self._gateway is not None, "sidecar not started"
        return self._gateway

    def _live_nodes(self) -> list[str]:
        """Nodes whose heartbeat streams this sidecar holds (rebuilt first after a loss)."""
        return [] if self.servicer is None else self.servicer.streamed_nodes()

    @property
    def degradation(self) -> Degradation:
        assert self._degradation is not None, "sidecar not started"
        return self._degradation

    @property
    def feed(self) -> ChangeFeed:
        assert self._feed is not None, "sidecar not started"
        return self._feed

    @property
    def checker(self) -> VersionChecker:
        assert self._checker is not None, "sidecar not started"
        return self._checker

    @property
    def tiers(self) -> Tiers:
        assert self._tiers is not None, "sidecar not started"
        return self._tiers

    async def __aenter__(self) -> Sidecar:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        s = self.settings
        url = s.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(s.data_dir, binary=s.redis_server_bin)
            await self._embedded.start()
            url = self._embedded.url
        self._gateway = Gateway(
            url,
            s.namespace,
            timeout_s=s.redis_timeout_ms / 1000,
            hot_timeout_s=s.hot_timeout_ms / 1000,
            log_maxlen=s.log_maxlen,
            metrics_epsilon=s.metrics_epsilon,
            heartbeat_batch_max=s.heartbeat_batch_max,
            weights=s.weights(),
            reconcile_grace_ms=s.reconcile_grace_ms,
            adopt_lease_ms=s.default_lease_ms,
        )
        if s.journal:  # first: a data directory another sidecar holds fails fast
            path = s.data_dir / f"journal-{s.namespace}.jsonl"
            self._journal = Journal(path, fsync=s.journal_fsync)
        with background():
            epoch = await self._until_redis(self._gateway.ensure_epoch)
        self._feed = ChangeFeed(self._gateway, self.replica, block_ms=s.feed_block_ms)
        self._degradation = Degradation(
            self._gateway,
            self.replica,
            self._feed,
            l2_s=s.l2_ttl_ms / 1000,
            live_nodes=self._live_nodes,
            max_ops=s.write_buffer_max,
            max_heartbeats=s.heartbeat_buffer_max,
            probe_max_s=s.recovery_probe_max_ms / 1000,
            local_slot_budget=s.local_slot_budget if s.reservation_policy == "local" else 0,
            probe=self._gateway.probe(s.redis_timeout_ms / 1000),
            probe_interval_s=s.watchdog_interval_ms / 1000,
            thresholds=Thresholds(
                floor_s=s.watchdog_timeout_ms / 1000, ceiling_s=s.watchdog_ceiling_ms / 1000
            ),
            journal=self._journal,
        )
        self._degradation.restore_journal()
        self._feed.on_lost = self._degradation.trip
        degraded = lambda: self._degradation is not None and self._degradation.degraded  # noqa: E731
        self._checker = VersionChecker(
            self._gateway,
            self.replica,
            self._feed,
            interval_s=s.version_check_interval_ms / 1000,
            timeout_s=s.version_check_timeout_ms / 1000,
            paused=degraded,
            lost=self._degradation.trip,
        )
        self._tiers = Tiers(
            self._gateway,
            self.replica,
            self._feed,
            l2_s=s.l2_ttl_ms / 1000,
            miss_ttl_s=(s.miss_marker_min_ms / 1000, s.miss_marker_max_ms / 1000),
            complete_ms=s.complete_ms,
            paused=degraded,
        )
        gateway, degradation = self._gateway, self._degradation
        self.backpressure = Backpressure(
            Limits(
                queue_soft=s.heartbeat_queue_soft,
                queue_max=s.heartbeat_queue_max,
                lag_soft_s=s.heartbeat_lag_soft_ms / 1000,
                max_factor=s.heartbeat_max_stretch,
                hold_s=s.heartbeat_stretch_hold_ms / 1000,
            ),
            queued=lambda: gateway.heartbeats_queued,
            loop_lag=lambda: _median(itertools.islice(reversed(degradation.loop_lags), 200)),
            stretch=lambda factor: setattr(gateway, "stretch", factor),
        )
        self.servicer = RegistryServicer(
            s,
            self._gateway,
            self.replica,
            self._feed,
            self._checker,
            self._tiers,
            self._degradation,
            self.backpressure,
        )

        options = [
            # A port another process serves is a start-up error, not a shared port that
            # clients reach at random (gRPC sets SO_REUSEPORT by default).
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        self.metrics = Metrics(s, self._metric_readers)
        self._tracing = Tracing(s, self._span_exporter)
        self._tracing.instrument(self._gateway)
        self.servicer.tracer = self._tracing.tracer
        self.metrics.start(
            Parts(
                self._gateway,
                self.replica,
                self._checker,
                self._tiers,
                self._degradation,
                self.servicer,
                self.backpressure,
                self.supervisor,
                self.heap,
            )
        )
        # Tracing first, so the RPC timer's measurement happens inside the RPC's span.
        interceptors = [*self._tracing.interceptors(), *self.metrics.interceptors()]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_RegistryServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(s.listen)
        except RuntimeError as exc:  # grpcio >= 1.60 raises where it returned 0
            raise OSError(f"cannot listen on {s.listen}: {exc} (is the port in use?)") from exc
        if self.port == 0:
            raise OSError(f"cannot listen on {s.listen} (is the port in use?)")
        self._server = server
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        log.info("listening on %s (namespace %r, epoch %s)", self.address, s.namespace, epoch)

        # Not around server.start(): its tasks copy the context, and RPCs must be traced.
        with background():  # tasks copy this context: no spans from the loops
            await self._until_redis(self._feed.preload)
            self.heap.freeze()  # the preloaded replica is long-lived
            sup = self.supervisor
            sup.spawn("changefeed", self._feed.run)
            self.degradation.start(sup.spawn)
            sup.spawn("version-checker", self._checker.run)
            sup.spawn("revalidator", self._tiers.run)
            sup.spawn("expiry", self._expire_loop)
            sup.spawn("backpressure", self.backpressure.run)
            sup.spawn("heap", self.heap.run)
        self._serving = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d nodes at version %d", len(self.replica), self.replica.version)

    async def _until_redis(self, step: object) -> str:
        """Run a start-up step, waiting for Redis with backoff if it is not up yet."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Unavailable),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
            before_sleep=lambda st: log.warning(
                "waiting for Redis: %s", st.outcome.exception() if st.outcome else ""
            ),
            reraise=True,
        ):
            with attempt:
                result = await step()  # type: ignore[operator]
        return result  # type: ignore[no-any-return]

    async def _on_health(self, healthy: bool) -> None:
        """A background part keeps failing: NOT_SERVING (the replica may be going stale)
        until every part has run quietly for a while."""
        if not self._serving:
            return
        if healthy:
            log.warning("background parts healthy again: SERVING")
        else:
            log.error(
                "background parts keep failing (%s): NOT_SERVING",
                ", ".join(self.supervisor.unhealthy_parts()),
            )
        status = health_pb2.HealthCheckResponse
        await self._set_health(status.SERVING if healthy else status.NOT_SERVING)

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        await self._health.set("", status)
        await self._health.set(SERVICE_NAME, status)

    async def _expire_loop(self) -> None:
        """Every sidecar runs the expiry script; it is atomic and idempotent, so they may.

        The period is jittered so sidecars started together do not fire together. It
        pauses while degraded; the script itself notices when no sidecar could run it for
        a while and then extends deadlines rather than expiring the fleet.
        """
        s = self.settings
        period = s.expiry_interval_ms / 1000
        while True:
            await asyncio.sleep(period * random.uniform(0.8, 1.2))
            if self.degradation.degraded or self.degradation.draining:
                continue  # buffered heartbeats first, or their nodes would expire
            try:
                offline, removed, freed, shifted = await self.gateway.expire(
                    s.offline_grace_ms, pause_ms=s.self_preservation_pause_ms
                )
            except Unavailable as exc:
                log.debug("expiry skipped: %s", exc)
                continue
            if shifted:
                log.warning(
                    "no sidecar ran expiry for %d ms (every sidecar was stopped, or "
                    "none could reach Redis): every deadline and lease moved forward by "
                    "that much (self-preservation)",
                    shifted,
                )
            if offline or removed or freed:
                log.info("expiry: %d offline, %d removed, %d leases freed", offline, removed, freed)

    async def aclose(self) -> None:
        """Graceful stop: NOT_SERVING first, so balancers and probes look elsewhere.

        Each step is bounded: a stop must never hang, whatever a stream or Redis does.
        """
        self._serving = False
        if self._server is not None:
            server, self._server = self._server, None
            await _bounded(
                "health NOT_SERVING", self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            if self.servicer is not None:
                self.servicer.close_streams()
            await _bounded(
                "gRPC server stop",
                server.stop(self.settings.shutdown_grace_s),
                self.settings.shutdown_grace_s + 5,
            )
        # The loops stop before what they use closes.
        await _bounded("background parts", self.supervisor.aclose(), 10.0)
        for name, part in (
            ("revalidator", self._tiers),
            ("version checker", self._checker),
            ("degradation", self._degradation),
            ("change feed", self._feed),
            ("gateway", self._gateway),
            ("embedded redis", self._embedded),
        ):
            if part is not None:
                await _bounded(name, part.aclose())
        # Exporters flush on shutdown, blocking, to a collector that may be gone: off the
        # loop, and bounded like every other step.
        if self.metrics is not None:
            await _bounded("metrics", asyncio.to_thread(self.metrics.shutdown), 3.0)
        if self._tracing is not None:
            await _bounded("tracing", asyncio.to_thread(self._tracing.shutdown), 3.0)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._tiers = self._checker = self._degradation = None
        self._feed = None
        self._gateway = None
        self._embedded = None


def _median(values: Iterable[float]) -> float:
    """The event loop's typical lag over the last second: a saturated loop is late on
    most ticks, a single pause (a collection, a large reply) moves the median not at all."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


async def _bounded(step: str, work: Awaitable[object], timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(work, timeout)
    except TimeoutError:
        log.error("shutdown: %s did not finish within %.1f s; going on", step, timeout)
