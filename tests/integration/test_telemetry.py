"""Metrics and traces of a real sidecar: scrape ``/metrics`` after a workload, read spans.

The scrape goes over HTTP to the Prometheus endpoint the sidecar serves (port 0), and is
parsed with prometheus_client's own parser: what an operator's Prometheus would see.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from registry.config import from_sources
from registry.server import Sidecar
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.integration.test_sidecar import eventually, make_node
from tests.support.redis_proc import RedisProcess

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(sidecar: Sidecar) -> Samples:
    assert sidecar.metrics is not None
    url = f"http://{sidecar.metrics.address}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope")}
            out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the series of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert found, f"no series {name}{labels}; have {sorted({n for n, _ in samples})}"
    return sum(found)


@pytest.fixture
async def metered(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> Sidecar:
    return await sidecar_factory(redis_proc.url, namespace, metrics_listen="127.0.0.1:0")


@pytest.fixture
async def stub(metered: Sidecar) -> AsyncIterator[pb_grpc.RegistryServiceStub]:
    async with grpc.aio.insecure_channel(metered.address) as channel:
        yield pb_grpc.RegistryServiceStub(channel)


async def heartbeats(stub: pb_grpc.RegistryServiceStub, node_id: str, n: int) -> None:
    async def requests() -> AsyncIterator[pb.HeartbeatRequest]:
        for seq in range(1, n + 1):
            yield pb.HeartbeatRequest(node_id=node_id, seq=seq)

    acks = [ack async for ack in stub.Heartbeat(requests())]
    assert len(acks) == n


async def test_scrape_after_a_workload(metered: Sidecar, stub: pb_grpc.RegistryServiceStub) -> None:
    for i in range(3):
        await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node(f"n{i}", capacity=1)))
    await heartbeats(stub, "n0", 5)
    for _ in range(20):
        await stub.GetNode(pb.GetNodeRequest(node_id="n1"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetNode(pb.GetNodeRequest(node_id="nobody"))
    await stub.SelectNodes(pb.SelectNodesRequest(pool_id="p1", count=2))
    await stub.SelectNodes(pb.SelectNodesRequest(pool_id="p1", labels={"zone": "nowhere"}))
    await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n0", job_id="j1"))
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await stub.ReserveSlot(pb.ReserveSlotRequest(node_id="n0", job_id="j2"))
    assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await stub.Schedule(
        pb.ScheduleRequest(selector=pb.SelectNodesRequest(pool_id="p1"), job_id="j3")
    )

    await eventually(lambda: metered.checker.checks >= 1)
    m = await scrape(metered)
    lookups = "registry_cache_lookups_total"
    assert value(m, lookups, tier="l1", result="hit") >= 20
    assert value(m, "registry_heartbeats_received_total") == 5
    assert value(m, "registry_heartbeats_acknowledged_total", outcome="ok") == 5
    rpc = "rpc_server_call_duration_seconds_count"
    assert value(m, rpc, rpc_method="GetNode", rpc_grpc_status_code="0") == 20
    assert value(m, rpc, rpc_method="GetNode", rpc_grpc_status_code="5") == 1
    assert value(m, rpc, rpc_method="Heartbeat", rpc_grpc_status_code="0") == 1
    assert value(m, rpc, rpc_method="ReserveSlot", rpc_grpc_status_code="8") == 1
    redis_ops = "db_client_operation_duration_seconds_count"
    assert value(m, redis_ops, db_operation_name="register", db_system_name="redis") == 3
    assert value(m, redis_ops, db_operation_name="heartbeat") >= 1
    assert value(m, "db_client_operation_duration_seconds_sum") > 0
    reservations = "registry_reservations_total"
    assert value(m, reservations, rpc_method="ReserveSlot", outcome="created") == 1
    assert value(m, reservations, rpc_method="ReserveSlot", outcome="full") == 1
    assert value(m, reservations, rpc_method="Schedule", outcome="created") == 1
    assert value(m, "registry_selections_empty_total", rpc_method="SelectNodes") == 1
    assert value(m, "registry_degradation_mode", mode="NORMAL") == 1
    assert value(m, "registry_degradation_mode", mode="LOCAL_ONLY") == 0
    assert value(m, "registry_replica_nodes") == 3
    assert value(m, "registry_version_check_runs_total") >= 1
    assert value(m, "registry_changefeed_lag_versions") >= 0
    assert value(m, "registry_watch_streams") == 0
    conns = "db_client_connection_count"
    assert value(m, conns, db_client_connection_pool_name="hot") >= 1
    assert value(m, "registry_event_loop_lag_seconds") < 1
    assert value(m, "registry_heartbeat_interval_factor") == 1
    assert value(m, "registry_heartbeat_queue") == 0
    assert value(m, "registry_supervisor_healthy") == 1
    assert value(m, "registry_supervisor_failures_total", part="changefeed") == 0
    assert value(m, "registry_detector_verdicts_total", cause="silence") == 0
    assert 0.03 <= value(m, "registry_detector_threshold_seconds") <= 1.0
    assert value(m, "registry_gc_pause_seconds") >= 0

    # Every series the shipped dashboard and alert rules query exists (a renamed metric
    # would otherwise leave them silently empty).
    names = {name for name, _ in m} | {label for _, labels in m for label, _ in labels}
    names |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}  # histogram names
    for path in ("deploy/grafana/registry-dashboard.json", "deploy/prometheus/alerts.yml"):
        text = (ROOT / path).read_text()
        used = set(re.findall(r"\b(?:registry|rpc_server|db_client)_[a-z_]+\b", text))
        assert used and used <= names, f"{path} queries unknown series: {sorted(used - names)}"


async def test_degraded_period_is_counted(
    metered: Sidecar, stub: pb_grpc.RegistryServiceStub, redis_proc: RedisProcess
) -> None:
    await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("n1")))
    redis_proc.pause()
    try:
        await heartbeats(stub, "n1", 3)
        await eventually(lambda: metered.degradation.degraded, timeout=5)
        m = await scrape(metered)
        assert value(m, "registry_degradation_mode", mode="NORMAL") == 0
        assert value(m, "registry_writes_buffered_total", kind="heartbeat") >= 1
        assert value(m, "registry_writes_buffer_size", kind="heartbeats") == 1
    finally:
        redis_proc.resume()
    await eventually(lambda: metered.degradation.settled, timeout=10)
    m = await scrape(metered)
    assert value(m, "registry_degradation_mode", mode="NORMAL") == 1
    assert value(m, "registry_degradation_transitions_total", to="NORMAL") >= 1
    assert value(m, "registry_degradation_outages_total") >= 1
    assert value(m, "registry_heartbeats_acknowledged_total", outcome="buffered") >= 1


async def test_metrics_are_off_unless_configured(sidecar: Sidecar) -> None:
    assert sidecar.metrics is not None
    assert not sidecar.metrics.enabled
    assert sidecar.gateway.recorder is None


async def test_spans_for_rpcs_redis_and_heartbeats(
    sidecar_factory: SidecarFactory, redis_proc: RedisProcess, namespace: str
) -> None:
    spans = InMemorySpanExporter()
    sidecar = await sidecar_factory(redis_proc.url, namespace, span_exporter=spans)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("n1")))
        await heartbeats(stub, "n1", 3)

    def finished() -> list[ReadableSpan]:
        return list(spans.get_finished_spans())

    await eventually(lambda: any(s.name == "heartbeat batch" for s in finished()))
    await eventually(lambda: sidecar.checker.checks >= 3)
    # The background loops (version checks: MGET; expiry: EVALSHA) make no spans.
    assert not [s.name for s in finished() if s.parent is None and s.name.isupper()]
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in finished():
        by_name.setdefault(span.name, []).append(span)

    (register,) = by_name["/registry.v1.RegistryService/RegisterNode"]
    children = [
        s
        for s in finished()
        if s.parent is not None and s.parent.span_id == register.context.span_id
    ]
    assert any(s.name == "EVALSHA" for s in children), [s.name for s in children]

    messages = by_name["Heartbeat message"]
    assert len(messages) == 3
    (stream,) = by_name["/registry.v1.RegistryService/Heartbeat"]
    assert all(
        m.parent is not None and m.parent.span_id == stream.context.span_id for m in messages
    )
    assert {m.attributes["registry.heartbeat.outcome"] for m in messages if m.attributes} == {"OK"}
    batches = by_name["heartbeat batch"]
    linked = {link.context.span_id for b in batches for link in b.links}
    assert {m.context.span_id for m in messages} <= linked
    batch_ids = {b.context.span_id for b in batches}
    assert any(
        s.name == "EVALSHA" and s.parent and s.parent.span_id in batch_ids for s in finished()
    )


class Collector(
    metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer
):
    """An OTLP/gRPC collector that keeps what it is sent: metric and span names."""

    def __init__(self) -> None:
        self.metrics: set[str] = set()
        self.spans: set[str] = set()

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metrics.update(m.name for m in sm.metrics)
            return metrics_service_pb2.ExportMetricsServiceResponse()
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.update(s.name for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_otlp_export_follows_the_standard_variables(
    sidecar_factory: SidecarFactory,
    redis_proc: RedisProcess,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns on both pushes (config.py), and the SDK's
    exporters send to a real OTLP/gRPC endpoint."""
    collector = Collector()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = from_sources(environ=env)
        assert (settings.metrics_exporter, settings.traces_exporter) == ("otlp", "otlp")
        sidecar = await sidecar_factory(
            redis_proc.url,
            namespace,
            metrics_exporter=settings.metrics_exporter,
            traces_exporter=settings.traces_exporter,
        )
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            await stub.RegisterNode(pb.RegisterNodeRequest(node=make_node("n1")))
        await eventually(
            lambda: (
                {"registry.replica.nodes", "db.client.operation.duration"} <= collector.metrics
                and "/registry.v1.RegistryService/RegisterNode" in collector.spans
            ),
            timeout=10,
        )
        assert "EVALSHA" in collector.spans
        await sidecar.aclose()  # flushes to the collector while it still listens
    finally:
        await server.stop(None)
