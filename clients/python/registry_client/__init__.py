"""Python client of the node-registry sidecar (``registry.v1.RegistryService``).

``pb`` is the generated message module, so callers need one import::

    from registry_client import RegistryClient, pb

``RegistryClient`` is the asyncio client; ``SyncRegistryClient`` is the blocking one.
"""

from __future__ import annotations

from registry_client.client import RegistryClient, as_lang_pair, select_request
from registry_client.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RegistryError,
    ResourceExhausted,
    StreamBroken,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from registry_client.session import HeartbeatSession
from registry_client.sync import SyncRegistryClient, SyncWatcher
from registry_client.v1 import registry_pb2 as pb
from registry_client.watch import Watcher

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HeartbeatSession",
    "InvalidArgument",
    "NotFound",
    "RegistryClient",
    "RegistryError",
    "ResourceExhausted",
    "StreamBroken",
    "SyncRegistryClient",
    "SyncWatcher",
    "Unavailable",
    "Unimplemented",
    "Watcher",
    "as_lang_pair",
    "from_rpc_error",
    "pb",
    "select_request",
]
