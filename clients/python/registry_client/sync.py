"""SyncRegistryClient: the blocking client, for scripts, CLIs and threaded programs.

It mirrors :class:`registry_client.RegistryClient` method for method, on grpc's *sync*
channel (``grpc.insecure_channel``) rather than an event loop in a thread, so it can be
used from any thread and inside a program that already runs an event loop elsewhere.
Requests are built by the same functions as the async client's and failures raise the
same ``registry_client.errors`` classes, with the ``grpc.RpcError`` as ``__cause__``::

    with SyncRegistryClient("127.0.0.1:50051") as client:
        picked = client.select_nodes("translate", lang_pair=("en", "de"), count=2)
        for event in client.watch("translate"):   # blocks; close() from another thread
            ...

There is no sync heartbeat session: a node keeps its registration alive with the async
:class:`registry_client.HeartbeatSession`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
from tenacity import Retrying

from registry_client.client import (
    LangPairLike,
    Metadata,
    default_channel_options,
    list_nodes_request,
    schedule_request,
    select_request,
)
from registry_client.errors import StreamBroken, from_rpc_error
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc
from registry_client.watch import WatchPosition

log = logging.getLogger(__name__)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class SyncRegistryClient:
    """Blocking client of one sidecar; the same constructor and methods as the async one.

    ``SyncRegistryClient("127.0.0.1:50051")`` owns its channel and closes it in
    :meth:`close` (or at the end of a ``with`` block); a ``channel`` passed in stays the
    caller's. ``timeout`` is the gRPC deadline in seconds of every unary call (None: none);
    streams never get one. ``metadata`` is sent with every call. The client is thread-safe:
    one instance may serve every thread of a program.
    """

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 5.0,
        metadata: Metadata = (),
        options: Sequence[tuple[str, int | str]] | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str | bytes], ...] = tuple(metadata)
        self._owns_channel = channel is None
        if channel is None:
            channel = grpc.insecure_channel(
                target, options=list(options) if options is not None else default_channel_options()
            )
        self._channel = channel
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._closed = False

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, for health checks or reflection on the same connection."""
        return self._channel

    def __enter__(self) -> SyncRegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel if this client created it; open streams end. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_channel:
            self._channel.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected, e.g. while a sidecar is starting.

        Raises ``grpc.FutureTimeoutError`` after ``timeout`` seconds (None: wait forever);
        unary calls fail fast instead of waiting.
        """
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _unary(self, rpc: grpc.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req) -> _Resp:
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- nodes ---------------------------------------------------------------------------------

    def register_node(self, node: pb.Node, *, ttl_ms: int = 0) -> pb.RegisterNodeResponse:
        """Upsert ``node`` (idempotent); ``ttl_ms`` 0 picks the sidecar's default TTL.

        Without heartbeats the node goes OFFLINE after its TTL: register with a TTL as
        long as the node must stay, or heartbeat it with the async ``HeartbeatSession``.
        """
        return self._unary(
            self._stub.RegisterNode, pb.RegisterNodeRequest(node=node, ttl_ms=ttl_ms)
        )

    def deregister_node(self, node_id: str) -> pb.DeregisterNodeResponse:
        """Remove a node and free its reservations; ``existed`` is False if it was absent."""
        return self._unary(self._stub.DeregisterNode, pb.DeregisterNodeRequest(node_id=node_id))

    def drain_node(self, node_id: str) -> pb.DrainNodeResponse:
        """Stop new reservations on a node while it stays visible."""
        return self._unary(self._stub.DrainNode, pb.DrainNodeRequest(node_id=node_id))

    def get_node(self, node_id: str) -> pb.GetNodeResponse:
        """Read one node from the sidecar's replica; raises ``NotFound`` if absent."""
        return self._unary(self._stub.GetNode, pb.GetNodeRequest(node_id=node_id))

    def list_nodes(
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
        return self._unary(self._stub.ListNodes, request)

    def select_nodes(
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
        return self._unary(self._stub.SelectNodes, request)

    # -- job slots -----------------------------------------------------------------------------

    def reserve_slot(
        self, node_id: str, job_id: str, *, lease_ms: int = 0
    ) -> pb.ReserveSlotResponse:
        """Take a slot for ``job_id`` (idempotent: a repeat renews the lease, ``created=False``)."""
        request = pb.ReserveSlotRequest(node_id=node_id, job_id=job_id, lease_ms=lease_ms)
        return self._unary(self._stub.ReserveSlot, request)

    def release_slot(self, node_id: str, job_id: str) -> pb.ReleaseSlotResponse:
        """Free the slot of ``job_id`` (idempotent: a repeat returns ``released=False``)."""
        request = pb.ReleaseSlotRequest(node_id=node_id, job_id=job_id)
        return self._unary(self._stub.ReleaseSlot, request)

    def schedule(
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
        return self._unary(self._stub.Schedule, request)

    # -- pools and status ----------------------------------------------------------------------

    def put_pool(self, pool: pb.Pool) -> pb.PutPoolResponse:
        """Create or replace a pool's configuration."""
        return self._unary(self._stub.PutPool, pb.PutPoolRequest(pool=pool))

    def get_pool(self, pool_id: str) -> pb.GetPoolResponse:
        """One pool's configuration; raises ``NotFound`` if absent."""
        return self._unary(self._stub.GetPool, pb.GetPoolRequest(pool_id=pool_id))

    def list_pools(self) -> pb.ListPoolsResponse:
        """Every pool's configuration."""
        return self._unary(self._stub.ListPools, pb.ListPoolsRequest())

    def get_status(self) -> pb.GetStatusResponse:
        """Mode, versions and replica figures of the sidecar, for operators and readiness."""
        return self._unary(self._stub.GetStatus, pb.GetStatusRequest())

    # -- streams -------------------------------------------------------------------------------

    def heartbeat_stream(
        self, requests: Iterator[pb.HeartbeatRequest]
    ) -> grpc.CallIterator[pb.HeartbeatResponse]:
        """Open a raw Heartbeat stream fed by ``requests``; iterate it for the responses."""
        return self._stub.Heartbeat(requests, metadata=self._metadata)

    def watch_stream(self, request: pb.WatchRequest) -> grpc.CallIterator[pb.WatchEvent]:
        """Open a raw Watch stream without reconnects; most callers want :meth:`watch`."""
        return self._stub.Watch(request, metadata=self._metadata)

    def watch(
        self,
        pool_id: str = "",
        *,
        resume_token: str = "",
        max_reconnects: int | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        backoff_jitter_s: float = 0.5,
    ) -> SyncWatcher:
        """A reconnecting, blocking :class:`SyncWatcher` over the events of ``pool_id``."""
        return SyncWatcher(
            self,
            pool_id=pool_id,
            resume_token=resume_token,
            max_reconnects=max_reconnects,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            backoff_jitter_s=backoff_jitter_s,
        )


class SyncWatcher(WatchPosition[SyncRegistryClient]):
    """Blocking iterator over the ``WatchEvent``s of one pool (``pool_id=""``: every node).

    ``with client.watch("p") as watcher: for event in watcher: ...``

    The same semantics as the async :class:`registry_client.Watcher` (snapshot, resume
    tokens, ``snapshots``/``reconnects`` counters, ``max_reconnects``), with blocking
    waits. :meth:`close` may be called from another thread: the iteration then ends
    (``StopIteration``) instead of raising. Ctrl-C interrupts a blocked iteration.
    """

    def _init_stream(self) -> None:
        self._call: grpc.CallIterator[pb.WatchEvent] | None = None
        self._events: Iterator[pb.WatchEvent] | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        """Orders opening a stream against close(), so a closed watcher opens none."""

    def _is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connected(self) -> bool:
        """True while a stream is open (it may still be waiting for its first event)."""
        call = self._call
        return call is not None and call.is_active()

    def __iter__(self) -> SyncWatcher:
        return self

    def __next__(self) -> pb.WatchEvent:
        if self._closed.is_set():
            raise StopIteration
        retrying = Retrying(sleep=self._sleep, **self._retry_options())
        event: pb.WatchEvent | None = None
        for attempt in retrying:
            with attempt:
                event = self._next_event()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> SyncWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the stream and end the iteration. Idempotent; callable from any thread."""
        with self._lock:
            self._closed.set()
            self._drop_call()

    def _next_event(self) -> pb.WatchEvent | None:
        """The next event of the current stream, opening one if needed; None once closed."""
        events = self._events if self._events is not None else self._open()
        if events is None:
            return None
        try:
            message = next(events)
        except StopIteration:
            self._drop_call()
            if self._closed.is_set():
                return None
            raise StreamBroken("the sidecar ended the watch stream") from None
        except grpc.RpcError as exc:
            self._drop_call()
            if self._closed.is_set():
                return None  # close() cancelled the call under this read
            raise from_rpc_error(exc) from exc
        self._track(message)
        return message

    def _open(self) -> Iterator[pb.WatchEvent] | None:
        with self._lock:
            if self._closed.is_set():
                return None
            call = self._client.watch_stream(self._next_request())
            self._call = call
            self._events = iter(call)
            return self._events

    def _drop_call(self) -> None:
        call, self._call, self._events = self._call, None, None
        if call is not None:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped

    def _sleep(self, seconds: float) -> None:
        """Backoff that ends early on close(), so a closed watcher stops promptly."""
        self._closed.wait(seconds)


__all__ = ["SyncRegistryClient", "SyncWatcher"]
