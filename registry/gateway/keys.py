"""Key schema. Every key carries the namespace as its hash tag, so each script's keys
share one Redis Cluster slot, and ids are validated before they get here."""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one namespace (one partition; a cluster layout adds a partition suffix)."""

    namespace: str

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError("namespace must be 1-64 characters of [A-Za-z0-9._-]")

    @property
    def prefix(self) -> str:
        return "{" + self.namespace + "}:"

    @property
    def version(self) -> str:
        """Registry version: INCR'd once per logged change."""
        return self.prefix + "ver"

    @property
    def log(self) -> str:
        """Change log: a capped stream whose entry ids are ``<version>-0``."""
        return self.prefix + "log"

    @property
    def nodes(self) -> str:
        """Set of every node id, for preload and reload."""
        return self.prefix + "nodes"

    @property
    def expiry(self) -> str:
        """Sorted set of node id by liveness deadline (ms, Redis clock)."""
        return self.prefix + "expiry"

    @property
    def leases(self) -> str:
        """Sorted set of ``<node_id>/<job_id>`` by lease deadline."""
        return self.prefix + "leases"

    @property
    def epoch(self) -> str:
        """Identity of this data set; a new one means Redis lost the registry."""
        return self.prefix + "epoch"

    @property
    def expiry_run(self) -> str:
        """Redis time (ms) of the last expiry run by any sidecar (self-preservation)."""
        return self.prefix + "expiry_run"

    @property
    def pools(self) -> str:
        """Set of every configured pool id."""
        return self.prefix + "pools"

    @property
    def jobnode(self) -> str:
        """Hash of job id -> the node holding its slot: a job holds one slot at most."""
        return self.prefix + "jobnode"

    def pool(self, pool_id: str) -> str:
        """Hash with a pool's canonical spec JSON and version."""
        return f"{self.prefix}pool:{pool_id}"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def jobs(self, node_id: str) -> str:
        """Hash of job id -> lease deadline for one node's reservations."""
        return f"{self.prefix}jobs:{node_id}"
