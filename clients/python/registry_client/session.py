"""HeartbeatSession: keeps one node registered and heartbeating, across sidecar restarts.

This is the node-side counterpart of an etcd lease keepalive. One background task owns one
Heartbeat stream: it writes a request, waits for the response with the same ``seq``, sleeps
for the interval and repeats. Whatever breaks the stream (sidecar restart, network error,
missing or mismatched ack) makes it reopen the stream with exponential backoff and jitter
(tenacity), and whenever the registry answers ``HEARTBEAT_ACTION_REGISTER`` (the node expired,
was deregistered, or Redis lost it) the session registers the node again and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_never,
    wait_exponential_jitter,
)

from registry_client.errors import (
    STREAM_RETRYABLE_CODES,
    RegistryError,
    StreamBroken,
    from_rpc_error,
)
from registry_client.v1 import registry_pb2 as pb

if TYPE_CHECKING:
    from registry_client.client import RegistryClient

log = logging.getLogger(__name__)

MetricsProvider = Callable[[], "pb.NodeMetrics | None"]
"""Called before every heartbeat; None sends no metrics (the registry keeps the last ones)."""
JobsProvider = Callable[[], Iterable[str]]
"""Called before every heartbeat; returns the ids of the jobs the node runs right now."""

_HeartbeatCall = grpc.aio.StreamStreamCall[pb.HeartbeatRequest, pb.HeartbeatResponse]

_FALLBACK_INTERVAL_MS = 1_000


class HeartbeatSession:
    """Registers a node, then heartbeats it from a background task until closed.

    Use ``async with HeartbeatSession(client, node, ttl_ms=...)`` (or
    ``client.heartbeat_session(...)``). Entering registers the node once and raises if
    that fails, so misconfiguration (a bad node id, no sidecar) shows at startup; after
    that every failure is handled in the background and only counted and logged. A
    non-retryable failure (e.g. INVALID_ARGUMENT) stops the session and is kept in
    :attr:`error`.

    ``interval_ms`` None follows the interval the sidecar suggests in each response.
    ``seq`` increases by one per request over the session's whole life, across streams.
    Closing half-closes the stream so the sidecar sees a clean end; with
    ``deregister_on_close`` the node is removed from the registry afterwards.
    """

    def __init__(
        self,
        client: RegistryClient,
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
        close_timeout_s: float = 2.0,
    ) -> None:
        if not node.node_id:
            raise ValueError("node.node_id is required")
        if interval_ms is not None and interval_ms <= 0:
            raise ValueError("interval_ms must be positive")
        self._client = client
        self._node = pb.Node()
        self._node.CopyFrom(node)
        self._ttl_ms = ttl_ms
        self._interval_ms = interval_ms
        self._metrics_provider = metrics_provider
        self._jobs_provider = jobs_provider
        self._deregister_on_close = deregister_on_close
        self._wait = wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_jitter_s
        )
        self._ack_timeout_s = ack_timeout_s
        self._close_timeout_s = close_timeout_s

        self.last_response: pb.HeartbeatResponse | None = None
        """The last acknowledgement received."""
        self.registered: pb.Node | None = None
        """The node as the registry stored it at the last RegisterNode."""
        self.connected = False
        """True while a stream is open and has acknowledged at least one heartbeat."""
        self.sent = 0
        self.acked = 0
        self.reregistrations = 0
        """RegisterNode calls made because the registry answered HEARTBEAT_ACTION_REGISTER."""
        self.reconnects = 0
        """Streams that replaced a broken one and got acknowledged."""
        self.error: BaseException | None = None
        """Why the session stopped by itself, if it did."""

        self._seq = 0
        self._streams = 0
        self._interval_s = self._fallback_interval_ms() / 1000
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._progress = asyncio.Condition()
        self._closed = False

    @property
    def node_id(self) -> str:
        return self._node.node_id

    @property
    def running(self) -> bool:
        """True while the background task is alive (started, not closed, not failed)."""
        return self._task is not None and not self._task.done()

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> HeartbeatSession:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Register the node (raising on failure), then start heartbeating in the background."""
        if self._task is not None or self._closed:
            raise RuntimeError("a HeartbeatSession can be started once")
        await self._register()
        self._task = asyncio.create_task(self._run(), name=f"registry-heartbeat:{self.node_id}")

    async def aclose(self) -> None:
        """Stop heartbeating, half-close the stream, and deregister if asked. Idempotent.

        The background task gets ``close_timeout_s`` to finish the stream cleanly and is
        cancelled after that; it is gone when this returns, even if this is cancelled.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._close_timeout_s)
            except TimeoutError:
                log.warning("heartbeat session %s did not stop in time; cancelling", self.node_id)
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.wait([task])
        if self._deregister_on_close and task is not None:
            try:
                await self._client.deregister_node(self.node_id)
            except RegistryError as exc:
                log.warning("deregistering %s on close failed: %s", self.node_id, exc)

    async def wait_acked(self, n: int, timeout: float | None = None) -> None:
        """Wait until ``n`` heartbeats in total have been acknowledged.

        Raises ``TimeoutError`` after ``timeout`` seconds, or the session's :attr:`error`
        if it stopped first. Meant for tests and startup checks, not for hot paths.
        """

        def done() -> bool:
            return self.acked >= n or not self.running

        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(done)
        if self.acked < n:
            if self.error is not None:
                raise self.error
            raise RuntimeError(f"heartbeat session {self.node_id} stopped after {self.acked} acks")

    # -- background task -----------------------------------------------------------------------

    async def _run(self) -> None:
        retrying = AsyncRetrying(
            wait=self._wait,
            stop=stop_never,
            retry=retry_if_exception(self._should_retry),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._stream(attempt.retry_state)
        except Exception as exc:
            if not self._closing.is_set():
                self.error = exc
                log.error("heartbeat session %s stopped: %s", self.node_id, exc)
        finally:
            self.connected = False
            async with self._progress:
                self._progress.notify_all()

    async def _stream(self, retry_state: RetryCallState) -> None:
        """Run one Heartbeat stream until closing (returns) or until it breaks (raises)."""
        if self._closing.is_set():
            return
        call = self._client.heartbeat_stream()
        self._streams += 1
        acked_here = False
        try:
            while not self._closing.is_set():
                request = self._next_request()
                await call.write(request)
                self.sent += 1
                response = await self._read_ack(call)
                if response.seq != request.seq:
                    raise StreamBroken(f"ack carries seq {response.seq}, expected {request.seq}")
                if not acked_here:
                    acked_here = True
                    # Backoff counts failures since the last healthy stream, not since start.
                    retry_state.attempt_number = 1
                    self.connected = True
                    if self._streams > 1:
                        self.reconnects += 1
                        log.info("heartbeat stream for %s re-established", self.node_id)
                self.last_response = response
                self.acked += 1
                if response.action == pb.HEARTBEAT_ACTION_REGISTER:
                    log.info("registry asked %s to register again", self.node_id)
                    await self._register()
                    self.reregistrations += 1
                async with self._progress:
                    self._progress.notify_all()
                self._interval_s = self._next_interval_ms(response) / 1000
                await self._sleep(self._interval_s)
            await self._half_close(call)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        except asyncio.InvalidStateError as exc:  # write after the server ended the call
            raise StreamBroken("the sidecar ended the heartbeat stream") from exc
        finally:
            self.connected = False
            call.cancel()

    async def _read_ack(self, call: _HeartbeatCall) -> pb.HeartbeatResponse:
        timeout = self._ack_timeout_s or max(1.0, 2 * self._interval_s)
        try:
            message = await asyncio.wait_for(call.read(), timeout)
        except TimeoutError as exc:
            raise StreamBroken(f"no heartbeat ack within {timeout:.1f}s") from exc
        if not isinstance(message, pb.HeartbeatResponse):  # grpc.aio.EOF
            raise StreamBroken("the sidecar ended the heartbeat stream")
        return message

    async def _half_close(self, call: _HeartbeatCall) -> None:
        """Tell the sidecar we are done and let it end the call, so neither side sees an error."""
        with contextlib.suppress(
            grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, TimeoutError
        ):
            await call.done_writing()
            async with asyncio.timeout(self._close_timeout_s / 2):
                while isinstance(await call.read(), pb.HeartbeatResponse):
                    pass

    async def _register(self) -> None:
        response = await self._client.register_node(self._node, ttl_ms=self._ttl_ms)
        self.registered = response.node

    def _next_request(self) -> pb.HeartbeatRequest:
        self._seq += 1
        request = pb.HeartbeatRequest(node_id=self.node_id, seq=self._seq)
        if self._metrics_provider is not None:
            try:
                metrics = self._metrics_provider()
            except Exception:
                log.exception(
                    "metrics provider of %s failed; heartbeat without metrics", self.node_id
                )
            else:
                if metrics is not None:
                    request.metrics.CopyFrom(metrics)
        if self._jobs_provider is not None:
            try:
                jobs = list(self._jobs_provider())
            except Exception:
                # Reporting nothing is safe; reporting a wrong empty list would free live slots.
                log.exception("jobs provider of %s failed; heartbeat without jobs", self.node_id)
            else:
                request.running_job_ids.extend(jobs)
                request.report_jobs = True
        return request

    def _fallback_interval_ms(self) -> int:
        return self._ttl_ms // 3 if self._ttl_ms > 0 else _FALLBACK_INTERVAL_MS

    def _next_interval_ms(self, response: pb.HeartbeatResponse) -> int:
        if self._interval_ms is not None:
            return self._interval_ms
        if response.interval_ms > 0:
            return response.interval_ms
        return self._fallback_interval_ms()

    def _should_retry(self, exc: BaseException) -> bool:
        if self._closing.is_set():
            return False
        return isinstance(exc, RegistryError) and exc.code in STREAM_RETRYABLE_CODES

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the session is closing, so close is prompt."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "heartbeat stream for %s broke (%s); reconnecting in %.2fs",
            self.node_id,
            exc,
            retry_state.upcoming_sleep,
        )


__all__ = ["HeartbeatSession", "JobsProvider", "MetricsProvider"]
