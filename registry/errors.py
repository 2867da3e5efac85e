"""One exception root for the domain; the servicer maps each class to a gRPC status."""

from __future__ import annotations

from registry.model import Breakdown


class RegistryError(Exception):
    """Root of every error the domain raises on purpose."""


class InvalidArgument(RegistryError):
    """Bad input. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(RegistryError):
    pass


class FailedPrecondition(RegistryError):
    """The node is draining or offline."""


class ResourceExhausted(RegistryError):
    """No free slot, or a stream fell too far behind."""

    def __init__(self, message: str, breakdown: Breakdown | None = None) -> None:
        super().__init__(message)
        self.breakdown = breakdown
        """For a failed Schedule: the selection's Breakdown, sent as a status detail."""


class AlreadyExists(RegistryError):
    """The job already holds a slot on another node."""

    def __init__(self, message: str, node_id: str) -> None:
        super().__init__(message)
        self.node_id = node_id


class Unavailable(RegistryError):
    """Redis is needed and cannot be reached; the call may be retried."""


class Aborted(RegistryError):
    """A version conflict."""


class Unimplemented(RegistryError):
    pass
