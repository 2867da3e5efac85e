"""RegistryClient: the asyncio client of ``registry.v1.RegistryService``.

One method per unary RPC. Every method returns the RPC's *response message* (never a bare
``Node``), so the freshness of reads, ``created``/``released`` flags and lease deadlines are
never thrown away; ``(await client.get_node("n1")).node`` is the node. Failed RPCs raise the
``registry_client.errors`` hierarchy, with the ``grpc.aio.AioRpcError`` as ``__cause__``.

The two streams get helpers that keep them alive: :meth:`RegistryClient.heartbeat_session`
and :meth:`RegistryClient.watch`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from registry_client.errors import from_rpc_error
from registry_client.session import HeartbeatSession, JobsProvider, MetricsProvider
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc
from registry_client.watch import Watcher

log = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

LangPairLike = pb.LanguagePair | tuple[str, str]
"""A language pair as a message or as ``(src, tgt)``."""

Metadata = Sequence[tuple[str, str | bytes]]

DEFAULT_MAX_SEND_BYTES = 4 * 1024 * 1024
"""Matches the sidecar's default ``max_message_bytes``; a bigger request would be refused."""
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
"""ListNodes over a large fleet can exceed gRPC's 4 MiB default; the sidecar is trusted."""


def default_channel_options(
    max_send_bytes: int = DEFAULT_MAX_SEND_BYTES,
    max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES,
) -> list[tuple[str, int]]:
    """Channel options for a sidecar on loopback.

    Reconnect backoff is capped at 2 s (gRPC's default is 120 s): a restarted sidecar on the
    same host comes back within a second, and heartbeats must resume before the node's TTL
    runs out. Keepalive pings only while calls are open, no more often than every 30 s, so
    a server with gRPC's default ping policy never answers with GOAWAY "too_many_pings";
    they exist to detect a half-open connection under a long-lived stream.
    """
    return [
        ("grpc.max_send_message_length", max_send_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.enable_retries", 0),
    ]


def as_lang_pair(value: LangPairLike) -> pb.LanguagePair:
    """Accept ``("en", "de")`` wherever a ``LanguagePair`` is expected."""
    if isinstance(value, pb.LanguagePair):
        return value
    src, tgt = value
    return pb.LanguagePair(src=src, tgt=tgt)


def select_request(
    pool_id: str = "",
    *,
    lang_pair: LangPairLike | None = None,
    required_services: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    count: int = 0,
    exclude_node_ids: Iterable[str] = (),
    min_health: float = 0.0,
) -> pb.SelectNodesRequest:
    """Build the selector shared by SelectNodes and Schedule from keywords."""
    request = pb.SelectNodesRequest(
        pool_id=pool_id,
        required_services=list(required_services),
        labels=dict(labels or {}),
        count=count,
        exclude_node_ids=list(exclude_node_ids),
        min_health=min_health,
    )
    if lang_pair is not None:
        request.lang_pair.CopyFrom(as_lang_pair(lang_pair))
    return request


def list_nodes_request(
    *,
    pool_id: str = "",
    lang_pair: LangPairLike | None = None,
    status: pb.NodeStatus.ValueType = pb.NODE_STATUS_UNSPECIFIED,
    labels: Mapping[str, str] | None = None,
) -> pb.ListNodesRequest:
    """Build a ListNodes request from keywords (shared by the async and the sync client)."""
    request = pb.ListNodesRequest(pool_id=pool_id, status=status, labels=dict(labels or {}))
    if lang_pair is not None:
        request.lang_pair.CopyFrom(as_lang_pair(lang_pair))
    return request


def schedule_request(
    job_id: str,
    pool_id: str = "",
    *,
    selector: pb.SelectNodesRequest | None = None,
    lang_pair: LangPairLike | None = None,
    required_services: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    count: int = 0,
    exclude_node_ids: Iterable[str] = (),
    min_health: float = 0.0,
    lease_ms: int = 0,
) -> pb.ScheduleRequest:
    """Build a Schedule request; ``selector`` overrides the filter keywords."""
    if selector is None:
        selector = select_request(
            pool_id,
            lang_pair=lang_pair,
            required_services=required_services,
            labels=labels,
            count=count,
            exclude_node_ids=exclude_node_ids,
            min_health=min_health,
        )
    return pb.ScheduleRequest(selector=selector, job_id=job_id, lease_ms=lease_ms)


class RegistryClient:
    """Asyncio client of one sidecar.

    ``RegistryClient("127.0.0.1:50051")`` owns its channel and closes it in :meth:`aclose`;
    a ``channel`` passed in (e.g. a secure one) stays the caller's to close. ``timeout`` is
    the gRPC deadline in seconds of every unary call (None: none); it reaches the sidecar,
    which stops working on an expired call. A hot path that wants a tighter deadline shares
    the channel: ``RegistryClient(target, channel=client.channel, timeout=0.05)``. Streams
    never get a deadline. ``metadata`` is sent with every call (e.g. an authorization token).
    """

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 5.0,
        metadata: Metadata = (),
        options: Sequence[tuple[str, int | str]] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str | bytes], ...] = tuple(metadata)
        self._owns_channel = channel is None
        if channel is None:
            channel = grpc.aio.insecure_channel(
                target, options=list(options) if options is not None else default_channel_options()
            )
        self._channel = channel
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._closed = False

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, for health checks or reflection on the same connection."""
        return self._channel

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel if this client created it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_channel:
            await self._channel.close(None)

    async def wait_ready(self) -> None:
        """Wait until the channel is connected, e.g. while a sidecar is starting.

        Bound it with ``asyncio.timeout()``; unary calls fail fast instead of waiting.
        """
        await self._channel.channel_ready()

    async def _unary(
        self, rpc: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req
    ) -> _Resp:
        try:
            return await rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- nodes ---------------------------------------------------------------------------------

    async def register_node(self, node: pb.Node, *, ttl_ms: int = 0) -> pb.RegisterNodeResponse:
        """Upsert ``node`` (idempotent); ``ttl_ms`` 0 picks the sidecar's default TTL."""
        request = pb.RegisterNodeRequest(node=node, ttl_ms=ttl_ms)
        return await self._unary(self._stub.RegisterNode, request)

    async def deregister_node(self, node_id: str) -> pb.DeregisterNodeResponse:
        """Remove a node and free its reservations; ``existed`` is False if it was absent."""
        request = pb.DeregisterNodeRequest(node_id=node_id)
        return await self._unary(self._stub.DeregisterNode, request)

    async def drain_node(self, node_id: str) -> pb.DrainNodeResponse:
        """Stop new reservations on a node while it stays visible."""
        request = pb.DrainNodeRequest(node_id=node_id)
        return await self._unary(self._stub.DrainNode, request)

    async def get_node(self, node_id: str) -> pb.GetNodeResponse:
        """Read one node from the sidecar's replica; raises ``NotFound`` if absent."""
        request = pb.GetNodeRequest(node_id=node_id)
        return await self._unary(self._stub.GetNode, request)

    async def list_nodes(
        self,
        *,
        pool_id: str = "",
        lang_pair: LangPairLike | None = None,
        status: pb.NodeStatus.ValueType = pb.NODE_STATUS_UNSPECIFIED,
        labels: Mapping[str, str] | None = None,
    ) -> pb.ListNodesResponse:
        """Nodes matching every given filter; no filter lists the whole fleet."""
        request = list_nodes_request(
            pool_id=pool_id, lang_pair=lang_pair, status=status, labels=labels
        )
        return await self._unary(self._stub.ListNodes, request)

    async def select_nodes(
        self,
        pool_id: str = "",
        *,
        lang_pair: LangPairLike | None = None,
        required_services: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        count: int = 0,
        exclude_node_ids: Iterable[str] = (),
        min_health: float = 0.0,
    ) -> pb.SelectNodesResponse:
        """Ranked candidates for a job plus a breakdown of why the others were excluded."""
        request = select_request(
            pool_id,
            lang_pair=lang_pair,
            required_services=required_services,
            labels=labels,
            count=count,
            exclude_node_ids=exclude_node_ids,
            min_health=min_health,
        )
        return await self._unary(self._stub.SelectNodes, request)

    # -- job slots -----------------------------------------------------------------------------

    async def reserve_slot(
        self, node_id: str, job_id: str, *, lease_ms: int = 0
    ) -> pb.ReserveSlotResponse:
        """Take a slot for ``job_id`` (idempotent: a repeat renews the lease, ``created=False``)."""
        request = pb.ReserveSlotRequest(node_id=node_id, job_id=job_id, lease_ms=lease_ms)
        return await self._unary(self._stub.ReserveSlot, request)

    async def release_slot(self, node_id: str, job_id: str) -> pb.ReleaseSlotResponse:
        """Free the slot of ``job_id`` (idempotent: a repeat returns ``released=False``)."""
        request = pb.ReleaseSlotRequest(node_id=node_id, job_id=job_id)
        return await self._unary(self._stub.ReleaseSlot, request)

    async def schedule(
        self,
        job_id: str,
        pool_id: str = "",
        *,
        selector: pb.SelectNodesRequest | None = None,
        lang_pair: LangPairLike | None = None,
        required_services: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        count: int = 0,
        exclude_node_ids: Iterable[str] = (),
        min_health: float = 0.0,
        lease_ms: int = 0,
    ) -> pb.ScheduleResponse:
        """Select and reserve in one round trip; ``selector`` overrides the filter keywords."""
        request = schedule_request(
            job_id,
            pool_id,
            selector=selector,
            lang_pair=lang_pair,
            required_services=required_services,
            labels=labels,
            count=count,
            exclude_node_ids=exclude_node_ids,
            min_health=min_health,
            lease_ms=lease_ms,
        )
        return await self._unary(self._stub.Schedule, request)

    # -- pools and status ----------------------------------------------------------------------

    async def put_pool(self, pool: pb.Pool) -> pb.PutPoolResponse:
        """Create or replace a pool's configuration."""
        request = pb.PutPoolRequest(pool=pool)
        return await self._unary(self._stub.PutPool, request)

    async def get_pool(self, pool_id: str) -> pb.GetPoolResponse:
        """One pool's configuration; raises ``NotFound`` if absent."""
        request = pb.GetPoolRequest(pool_id=pool_id)
        return await self._unary(self._stub.GetPool, request)

    async def list_pools(self) -> pb.ListPoolsResponse:
        """Every pool's configuration."""
        return await self._unary(self._stub.ListPools, pb.ListPoolsRequest())

    async def get_status(self) -> pb.GetStatusResponse:
        """Mode, versions and replica figures of the sidecar, for operators and readiness."""
        return await self._unary(self._stub.GetStatus, pb.GetStatusRequest())

    # -- streams -------------------------------------------------------------------------------

    def heartbeat_stream(
        self,
    ) -> grpc.aio.StreamStreamCall[pb.HeartbeatRequest, pb.HeartbeatResponse]:
        """Open a raw Heartbeat stream (write/read style); most callers want a session."""
        return self._stub.Heartbeat(None, metadata=self._metadata)

    def watch_stream(
        self, request: pb.WatchRequest
    ) -> grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchEvent]:
        """Open a raw Watch stream without reconnects; most callers want :meth:`watch`."""
        return self._stub.Watch(request, metadata=self._metadata)

    def heartbeat_session(
        self,
        node: pb.Node,
        *,
        ttl_ms: int = 0,
        interval_ms: int | None = None,
        metrics_provider: MetricsProvider | None = None,
        jobs_provider: JobsProvider | None = None,
        deregister_on_close: bool = False,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        backoff_jitter_s: float = 0.5,
        ack_timeout_s: float | None = None,
    ) -> HeartbeatSession:
        """A :class:`HeartbeatSession` for ``node``; start it with ``async with``."""
        return HeartbeatSession(
            self,
            node,
            ttl_ms=ttl_ms,
            interval_ms=interval_ms,
            metrics_provider=metrics_provider,
            jobs_provider=jobs_provider,
            deregister_on_close=deregister_on_close,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            backoff_jitter_s=backoff_jitter_s,
            ack_timeout_s=ack_timeout_s,
        )

    def watch(
        self,
        pool_id: str = "",
        *,
        resume_token: str = "",
        max_reconnects: int | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        backoff_jitter_s: float = 0.5,
    ) -> Watcher:
        """A reconnecting :class:`Watcher` over the events of ``pool_id`` (empty: all nodes)."""
        return Watcher(
            self,
            pool_id=pool_id,
            resume_token=resume_token,
            max_reconnects=max_reconnects,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            backoff_jitter_s=backoff_jitter_s,
        )


__all__ = [
    "DEFAULT_MAX_RECEIVE_BYTES",
    "DEFAULT_MAX_SEND_BYTES",
    "LangPairLike",
    "RegistryClient",
    "as_lang_pair",
    "default_channel_options",
    "list_nodes_request",
    "schedule_request",
    "select_request",
]
