"""One exception root for the client and one table from gRPC status codes to its subclasses.

Callers catch ``NotFound`` or ``Unavailable`` instead of inspecting ``grpc.aio.AioRpcError``
codes, so the transport stays an implementation detail. The original error is always the
``__cause__`` of the mapped one.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import status_pb2

from registry_client.v1 import registry_pb2 as pb

STATUS_DETAILS_KEY = "grpc-status-details-bin"
"""Trailing metadata holding a google.rpc.Status with typed details (gRPC's convention)."""


class RegistryError(Exception):
    """Root of every error the registry client raises for a failed RPC."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later; safe because every write is idempotent."""
        return self.code in RETRYABLE_CODES

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name


class InvalidArgument(RegistryError):
    """Bad input; the details name the field. Retrying the same request cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RegistryError):
    """The node, pool or reservation does not exist (in the sidecar's replica)."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RegistryError):
    """The node is in the wrong state for the request, e.g. DRAINING or OFFLINE."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RegistryError):
    """No free slot, or a stream fell too far behind and was ended by the server.

    A failed Schedule says why in :attr:`breakdown`: how many nodes each filter excluded.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        details: str = "",
        *,
        code: grpc.StatusCode | None = None,
        breakdown: pb.SelectionBreakdown | None = None,
    ) -> None:
        super().__init__(details, code=code)
        self.breakdown = breakdown
        """The SelectionBreakdown sent as a status detail (Schedule), else None."""


class AlreadyExists(RegistryError):
    """The job already holds a slot on another node (ReserveSlot); release it there first."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(RegistryError):
    """The sidecar (or the Redis behind it, for writes) cannot be reached; retryable."""

    code = grpc.StatusCode.UNAVAILABLE


class StreamBroken(Unavailable):
    """A stream ended without an error status, or broke its protocol (no ack, wrong seq).

    Session and watcher treat it like UNAVAILABLE: the stream is reopened with backoff.
    """


class Aborted(RegistryError):
    """A version conflict; re-read and retry."""

    code = grpc.StatusCode.ABORTED


class Unimplemented(RegistryError):
    """The sidecar is older than this client and lacks the RPC."""

    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(RegistryError):
    """The call's timeout ran out; the write may or may not have happened (all are idempotent)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[RegistryError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        AlreadyExists,
        Unavailable,
        Aborted,
        Unimplemented,
        DeadlineExceeded,
    )
}

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
"""Codes after which a unary request may simply be sent again (every write is idempotent)."""

STREAM_RETRYABLE_CODES: frozenset[grpc.StatusCode] = RETRYABLE_CODES | {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""Codes after which a long-lived stream is reopened.

A stream's CANCELLED comes from the server or the transport (a local cancel surfaces as
``asyncio.CancelledError``), e.g. when a sidecar shuts down; RESOURCE_EXHAUSTED ends a Watch
that fell behind. Reopening with backoff is the right answer to all of them.
"""


def from_rpc_error(exc: grpc.RpcError) -> RegistryError:
    """Map a failed RPC to the client's exception; use ``raise from_rpc_error(e) from e``.

    Takes the ``grpc.aio.AioRpcError`` of the asyncio client and the ``grpc.RpcError`` of
    the sync one alike.
    """
    code = exc.code()
    details = exc.details() or ""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RegistryError(details, code=code)
    if cls is ResourceExhausted:
        return ResourceExhausted(details, breakdown=_breakdown(exc))
    return cls(details)


def _breakdown(exc: grpc.RpcError) -> pb.SelectionBreakdown | None:
    """The SelectionBreakdown among the status details, if the server sent one."""
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            breakdown = pb.SelectionBreakdown()
            if detail.Unpack(breakdown):
                return breakdown
    return None


__all__ = [
    "RETRYABLE_CODES",
    "STREAM_RETRYABLE_CODES",
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "RegistryError",
    "ResourceExhausted",
    "StreamBroken",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]
