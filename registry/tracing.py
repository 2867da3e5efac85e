"""Traces: a span per RPC, the Redis calls beneath it, a span per heartbeat message.

Off unless ``traces_exporter`` is set (``otlp`` or ``console``; it defaults from the
standard ``OTEL_*`` variables, which also give the endpoint, headers and sampler, e.g.
``OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01``).

- RPC spans come from opentelemetry-instrumentation-grpc's aio server interceptor, so a
  caller's ``traceparent`` makes them children of the caller's trace.
- Redis spans come from opentelemetry-instrumentation-redis, on this sidecar's own
  clients only (``instrument_client``: nothing process-wide is patched).
- Heartbeats are one long stream, and many nodes' heartbeats share one script call. So
  each message gets its own span (``Heartbeat message``, from receipt to answer), and
  each batch a root span (``heartbeat batch``) that links to the messages it carried,
  with the Redis call as its child: a slow heartbeat shows whether it waited for its
  batch, for Redis, or for the stream.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from registry.config import Settings
from registry.metrics import resource

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from registry.gateway import Gateway

log = logging.getLogger(__name__)


def background() -> AbstractContextManager[None]:
    """Context for the background loops (feed, version checks, revalidation, expiry):
    their Redis calls make no spans. Ten a second from an idle sidecar would be root
    spans of no request, crowding out the traces an operator looks for."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    cm: AbstractContextManager[None] = suppress_instrumentation()
    return cm


class Tracing:
    """One sidecar's tracer provider. ``exporter`` overrides the configured one (tests
    pass an in-memory exporter, exported synchronously)."""

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        """None when tracing is off: callers test it before building a span."""
        if exporter is None and not settings.traces_exporter:
            return
        # The SDK only when tracing is on (it costs import time and memory).
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        provider = TracerProvider(resource=resource())
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif settings.traces_exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        self._provider = provider
        self.tracer = provider.get_tracer("registry")
        log.info("tracing on (%s)", settings.traces_exporter or type(exporter).__name__)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor[Any, Any] = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self._provider
        )
        return [interceptor]

    def instrument(self, gateway: Gateway) -> None:
        """Redis spans for this gateway's clients, and batch spans for its heartbeats."""
        if self._provider is None:
            return
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        for client in (gateway.redis, gateway.bulk):
            RedisInstrumentor.instrument_client(client, tracer_provider=self._provider)
        gateway.tracer = self.tracer

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None
