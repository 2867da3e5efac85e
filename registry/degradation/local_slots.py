"""Slots granted from the local view while Redis is unreachable (policy ``local``).

A grant needs the node ONLINE in the replica with a free slot counting this sidecar's
earlier grants, and at most ``budget`` grants per node per outage. Each is buffered as a
``ReserveLocal`` command and replayed in order on recovery, where it is recorded even on
a node that filled up meanwhile: it was acknowledged. So a node's overcommit is bounded
by the grants other sidecars made on it during the same outage: at most ``budget`` x
(sidecars that were degraded) slots beyond capacity.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from registry.cache import Replica
from registry.degradation.buffer import WriteBuffer
from registry.degradation.commands import ReleaseSlot, ReserveLocal
from registry.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from registry.model import NodeStatus, Reservation


class LocalSlots:
    def __init__(self, replica: Replica, buffer: WriteBuffer, budget: int) -> None:
        self._replica = replica
        self._buffer = buffer
        self.budget = budget
        self.granted: dict[str, dict[str, int]] = {}
        """node_id -> job_id -> lease deadline (ms, wall clock), not yet replayed."""
        self.counts: Counter[str] = Counter()
        """granted, renewed, replayed, dropped (no longer applicable on replay)."""

    def restore(self) -> None:
        """After a restart: the grants still in the (journaled) buffer hold again."""
        now = int(time.time() * 1000)
        for _, command in self._buffer.ops:
            if isinstance(command, ReserveLocal):
                grants = self.granted.setdefault(command.node_id, {})
                grants[command.job_id] = now + command.lease_ms
            elif isinstance(command, ReleaseSlot):
                self.release(command.node_id, command.job_id)

    async def reserve(self, node_id: str, job_id: str, lease_ms: int) -> Reservation:
        holder = await self.job_holder(job_id)
        if holder is not None and holder != node_id:
            raise AlreadyExists(f"job {job_id!r} already holds a slot on node {holder!r}", holder)
        node = self._replica.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not registered")
        grants = self.granted.get(node_id, {})
        created = job_id not in grants
        if created:
            if node.status is not NodeStatus.ONLINE:
                raise FailedPrecondition(f"node {node_id!r} is {node.status.value}, not ONLINE")
            if node.running_jobs + len(grants) >= node.capacity:
                raise ResourceExhausted(f"node {node_id!r} has no free slot")
            if len(grants) >= self.budget:
                raise ResourceExhausted(
                    f"node {node_id!r}: this sidecar's local budget of {self.budget} "
                    "slots is used while Redis is unreachable; retry once it is back"
                )
        self._buffer.add(ReserveLocal(node_id, job_id, lease_ms))  # BufferFull: refused
        deadline = int(time.time() * 1000) + lease_ms
        self.granted.setdefault(node_id, {})[job_id] = deadline
        self.counts["granted" if created else "renewed"] += 1
        view = replace(node, running_jobs=node.running_jobs + len(self.granted[node_id]))
        return Reservation(view, created, deadline, buffered=True)

    async def job_holder(self, job_id: str) -> str | None:
        """The node of this sidecar's local grant for the job (Redis is out of reach)."""
        for node_id, grants in self.granted.items():
            if job_id in grants:
                return node_id
        return None

    def release(self, node_id: str, job_id: str) -> None:
        """A buffered release of a local grant frees its budget now (both replay in order)."""
        grants = self.granted.get(node_id)
        if grants is not None and grants.pop(job_id, None) is not None and not grants:
            del self.granted[node_id]

    def replayed(self, node_id: str, job_id: str, applied: bool) -> None:
        self.release(node_id, job_id)
        self.counts["replayed" if applied else "dropped"] += 1
