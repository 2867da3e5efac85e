"""Schedule: select candidates and reserve a slot on the first one that has it.

Candidates come in the selection's weighted random order, so schedulers racing for the
same pool try different nodes first. Each attempt is one reserve script, which is atomic
in Redis: a node that filled up since the replica last saw it just says so and the next
candidate is tried. Idempotent by job id: a job holds at most one slot in the registry,
so a retried Schedule finds its slot (wherever it is) and renews its lease.

The slots come from a ``Slots``: Redis (the gateway) normally; the degraded-mode local
grants under reservation policy ``local``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

from registry.cache import Replica
from registry.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from registry.model import Reservation, Scheduled, SelectionWeights, Selector
from registry.selection import Selection, select

log = logging.getLogger(__name__)


class Slots(Protocol):
    async def reserve(self, node_id: str, job_id: str, lease_ms: int) -> Reservation: ...

    async def job_holder(self, job_id: str) -> str | None: ...


async def schedule(
    gateway: Slots,
    replica: Replica,
    selector: Selector,
    job_id: str,
    lease_ms: int,
    *,
    attempts: int,
    weights: SelectionWeights,
) -> Scheduled:
    selection = select(replica, replace(selector, count=attempts), defaults=weights)
    tried = 0
    for node in selection.nodes:
        tried += 1
        try:
            reservation = await gateway.reserve(node.node_id, job_id, lease_ms)
        except AlreadyExists as held:
            return await _renew(gateway, held.node_id, job_id, lease_ms, tried + 1, selection)
        except (ResourceExhausted, FailedPrecondition, NotFound) as exc:
            log.debug("schedule %s: %s", job_id, exc)
            continue
        return Scheduled(reservation, tried, selection.breakdown)
    # Nothing eligible took it; the job may still hold a slot from an earlier attempt (its
    # node is then full or filtered out): a retried Schedule must return that slot.
    holder = await gateway.job_holder(job_id)
    if holder is not None:
        return await _renew(gateway, holder, job_id, lease_ms, tried + 1, selection)
    b = selection.breakdown
    raise ResourceExhausted(
        f"no node could take job {job_id!r}: {b.eligible} eligible of {b.considered}, "
        f"{tried} tried (see the SelectionBreakdown detail)",
        breakdown=b,
    )


async def _renew(
    gateway: Slots, node_id: str, job_id: str, lease_ms: int, tried: int, selection: Selection
) -> Scheduled:
    reservation = await gateway.reserve(node_id, job_id, lease_ms)
    return Scheduled(reservation, tried, selection.breakdown)
