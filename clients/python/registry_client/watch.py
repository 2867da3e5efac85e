"""Watcher: a Watch stream that survives sidecar restarts without losing or repeating events.

:class:`WatchPosition` holds the part shared with the blocking ``SyncWatcher`` (sync.py):
the resume position and the reconnect policy. Semantics, in the order a caller meets them:

* The first stream starts from ``resume_token``; an empty token (the default) makes the
  sidecar send a snapshot: zero or more ``SNAPSHOT`` events, then ``SNAPSHOT_END``. Live
  events (``PUT``, ``DELETE``, ``BOOKMARK``) follow.
* The watcher remembers the token of every event that carries one (bookmarks included).
  When the stream breaks it reopens it with that token after an exponential, jittered
  backoff (tenacity), so the caller sees one continuous sequence: nothing repeated,
  nothing missed.
* If the sidecar cannot resume from the token (too old, trimmed log, Redis lost its data),
  it sends a new snapshot. The watcher passes it through unchanged; the caller must then
  rebuild its state from the snapshot instead of patching it.
* Tokens seen inside a snapshot are only adopted at ``SNAPSHOT_END``: a stream that breaks
  mid-snapshot is resumed with the token from before the snapshot, so the sidecar sends a
  complete snapshot again rather than live events on top of half a state.
* :attr:`Watcher.snapshots` counts snapshots begun. When it changes, a new snapshot started
  (possibly replacing an interrupted one): clear the scratch state you build from SNAPSHOT
  events and swap it in at SNAPSHOT_END.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc
import grpc.aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
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
    from registry_client.client import RegistryClient  # noqa: F401  (a string in a base class)

log = logging.getLogger(__name__)

_WatchCall = grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchEvent]

_Client = TypeVar("_Client")


class WatchPosition(Generic[_Client]):
    """Where a watch stream is and how it reconnects, shared by the async and sync watchers.

    Holds the resume token (with the snapshot rule of the module docstring), the counters
    callers read, and the retry policy; the subclasses own the stream, the waiting and
    closing, and set up their state in :meth:`_init_stream`.
    """

    def __init__(
        self,
        client: _Client,
        *,
        pool_id: str = "",
        resume_token: str = "",
        max_reconnects: int | None = None,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        backoff_jitter_s: float = 0.5,
    ) -> None:
        if max_reconnects is not None and max_reconnects < 0:
            raise ValueError("max_reconnects must be None or >= 0")
        self.pool_id = pool_id
        self.resume_token = resume_token
        """Where a new stream would resume; persist it to resume after a process restart."""
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        """Streams opened to replace a broken one, over the watcher's whole life."""
        self.snapshots = 0
        """Snapshots begun (see the module docstring for how to use it)."""
        self.last_version = 0
        """Version of the last event that carried one."""
        self._wait = wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_jitter_s
        )
        self._streams = 0
        self._in_snapshot = False
        self._snapshot_token = ""
        self._client = client
        self._init_stream()

    def _init_stream(self) -> None:
        """Set up the subclass's stream state; the last step of ``__init__``."""
        raise NotImplementedError

    def _is_closed(self) -> bool:
        raise NotImplementedError

    def _retry_options(self) -> dict[str, Any]:
        """tenacity's options for reading one event: reopen the stream after a retryable
        error, with backoff, up to ``max_reconnects`` times in a row (read per event, so a
        caller may change it between events). The subclass adds its own ``sleep``."""
        stop = (
            stop_never
            if self.max_reconnects is None
            else stop_after_attempt(self.max_reconnects + 1)
        )
        return {
            "wait": self._wait,
            "stop": stop,
            "retry": retry_if_exception(self._should_retry),
            "before_sleep": self._log_retry,
            "reraise": True,
        }

    def _should_retry(self, exc: BaseException) -> bool:
        if self._is_closed():
            return False
        return isinstance(exc, RegistryError) and exc.code in STREAM_RETRYABLE_CODES

    def _next_request(self) -> pb.WatchRequest:
        """The request of a new stream, counting it as a reconnect after the first."""
        self._streams += 1
        if self._streams > 1:
            self.reconnects += 1
        self._in_snapshot = False
        log.debug("opening watch pool=%r token=%r", self.pool_id, self.resume_token)
        return pb.WatchRequest(resume_token=self.resume_token, pool_id=self.pool_id)

    def _track(self, event: pb.WatchEvent) -> None:
        """Keep the resume position; see the module docstring for the snapshot rule."""
        if event.version:
            self.last_version = event.version
        if event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT:
            if not self._in_snapshot:
                self._in_snapshot = True
                self._snapshot_token = ""
                self.snapshots += 1
            if event.resume_token:
                self._snapshot_token = event.resume_token
        elif event.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END:
            if not self._in_snapshot:
                self.snapshots += 1  # an empty snapshot is just its end marker
                self._snapshot_token = ""
            self._in_snapshot = False
            token = event.resume_token or self._snapshot_token
            if token:
                self.resume_token = token
        elif event.resume_token and not self._in_snapshot:
            self.resume_token = event.resume_token

    def _log_retry(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning(
            "watch stream (pool=%r) broke (%s); reconnecting in %.2fs",
            self.pool_id,
            exc,
            retry_state.upcoming_sleep,
        )


class Watcher(WatchPosition["RegistryClient"]):
    """Async iterator over the ``WatchEvent``s of one pool (``pool_id=""``: every node).

    ``async with client.watch("p") as watcher: async for event in watcher: ...``

    ``max_reconnects`` bounds how many times in a row the stream is reopened without an
    event arriving in between (None: never give up); past it the last error is raised
    from the iteration, e.g. ``Unavailable``. Errors that retrying cannot fix, such as
    ``InvalidArgument`` for a bad pool id, are raised at once. Iteration ends after
    :meth:`aclose`, which may be called from another task.
    """

    def _init_stream(self) -> None:
        self._call: _WatchCall | None = None
        self._closed = asyncio.Event()

    def _is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connected(self) -> bool:
        """True while a stream is open (it may still be waiting for its first event)."""
        return self._call is not None and not self._call.done()

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> pb.WatchEvent:
        if self._closed.is_set():
            raise StopAsyncIteration
        retrying = AsyncRetrying(sleep=self._sleep, **self._retry_options())
        event: pb.WatchEvent | None = None
        async for attempt in retrying:
            with attempt:
                event = await self._next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the stream and end the iteration. Idempotent."""
        self._closed.set()
        self._drop_call()

    async def _next_event(self) -> pb.WatchEvent | None:
        """The next event of the current stream, opening one if needed; None once closed."""
        if self._closed.is_set():
            return None
        call = self._call if self._call is not None else self._open()
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            self._drop_call()
            raise from_rpc_error(exc) from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed.is_set() and task is not None and not task.cancelling():
                return None  # aclose() cancelled the call under this read
            raise
        if not isinstance(message, pb.WatchEvent):  # grpc.aio.EOF
            self._drop_call()
            if self._closed.is_set():
                return None
            raise StreamBroken("the sidecar ended the watch stream")
        self._track(message)
        return message

    def _open(self) -> _WatchCall:
        self._call = self._client.watch_stream(self._next_request())
        return self._call

    def _drop_call(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _sleep(self, seconds: float) -> None:
        """Backoff that ends early on aclose(), so a closed watcher stops promptly."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)


__all__ = ["WatchPosition", "Watcher"]
