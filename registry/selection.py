"""Node selection: filters, a randomised ranking that spreads load, and the breakdown.

Filters run as array operations over the replica's columnar index (registry/index.py),
in a fixed order; each node is counted under the first filter that removes it:

    wrong_pool, wrong_lang_pair, excluded_id, offline, draining, missing_service, labels,
    low_health, full

A pool adds its own requirements to the request's (docs/scheduling.md): one of its
language pairs, its services and labels, at least its min_health, and its weights.

Ranking: many schedulers share one view, so a deterministic "best first" would send every
concurrent job to the same node. Instead the eligible nodes are put in a weighted random
order (Efraimidis-Spirakis sampling without replacement) with weight
``health * free_slots ** free_capacity``: a node twice as healthy, or with twice the free
slots, comes first twice as often, and equal nodes share the load evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from registry.cache import Replica
from registry.errors import NotFound
from registry.health import health_column
from registry.index import STATUS_CODE, Mask, label_key, lang_key, pool_key, service_key
from registry.model import (
    DEFAULT_WEIGHTS,
    Breakdown,
    LanguagePair,
    Node,
    NodeFilter,
    NodeStatus,
    Pool,
    SelectionWeights,
    Selector,
)

_OFFLINE = STATUS_CODE[NodeStatus.OFFLINE]
_DRAINING = STATUS_CODE[NodeStatus.DRAINING]

_rng = np.random.default_rng()


@dataclass(frozen=True, slots=True)
class Selection:
    nodes: list[Node]
    """Eligible nodes in drawn order (at most ``count``)."""
    breakdown: Breakdown


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a selection asks for once a pool's configuration is merged into the request."""

    lang_pairs: frozenset[LanguagePair] | None
    """A node must serve one of these; None: any."""
    services: frozenset[str]
    labels: tuple[tuple[str, str], ...]
    min_health: float
    weights: SelectionWeights | None
    """None: rank by the stored health score (the sidecar's default weights)."""
    free_capacity: float


def requirements(sel: Selector, pool: Pool | None, defaults: SelectionWeights) -> Requirements:
    """Merge a pool's configuration into a request. The request's labels win on a clash."""
    lang_pairs: frozenset[LanguagePair] | None = None
    if sel.lang_pair is not None:
        allowed = pool is None or not pool.lang_pairs or sel.lang_pair in pool.lang_pairs
        lang_pairs = frozenset({sel.lang_pair}) if allowed else frozenset()
    elif pool is not None and pool.lang_pairs:
        lang_pairs = pool.lang_pairs
    services = set(sel.required_services)
    labels = dict(pool.labels) if pool is not None else {}
    labels.update(sel.labels)
    min_health = sel.min_health
    weights = None
    if pool is not None:
        services.update(pool.required_services)
        min_health = max(min_health, pool.min_health)
        weights = pool.weights
    free_capacity = (weights or defaults).free_capacity
    if weights is not None and weights.health_vector() == defaults.health_vector():
        weights = None
    return Requirements(
        lang_pairs,
        frozenset(services),
        tuple(sorted(labels.items())),
        min_health,
        weights,
        free_capacity,
    )


def select(
    replica: Replica,
    sel: Selector,
    rng: np.random.Generator | None = None,
    defaults: SelectionWeights = DEFAULT_WEIGHTS,
) -> Selection:
    """Filter, count and draw. Raises NotFound for a pool nobody configured or declared."""
    pool = replica.pools.get(sel.pool_id) if sel.pool_id else None
    if sel.pool_id and pool is None and not replica.knows_pool(sel.pool_id):
        raise NotFound(f"pool {sel.pool_id!r} is unknown: not configured and no node declares it")
    req = requirements(sel, pool, defaults)
    idx = replica.index
    n = idx.size
    b = Breakdown(considered=len(idx))
    cand = idx.used()

    def cut(keep: Mask) -> int:
        nonlocal cand
        before = int(np.count_nonzero(cand))
        cand = cand & keep
        return before - int(np.count_nonzero(cand))

    if sel.pool_id:
        b.wrong_pool = cut(idx.mask(pool_key(sel.pool_id)))
    if req.lang_pairs is not None:
        b.wrong_lang_pair = cut(idx.any_of(lang_key(p) for p in req.lang_pairs))
    if sel.exclude_node_ids:
        b.excluded_id = cut(~idx.slots_of(sel.exclude_node_ids))
    status = idx.status[:n]
    b.offline = cut(status != _OFFLINE)
    b.draining = cut(status != _DRAINING)
    if req.services:
        b.missing_service = cut(_all_of(idx.mask(service_key(s)) for s in req.services))
    if req.labels:
        b.labels = cut(_all_of(idx.mask(label_key(k, v)) for k, v in req.labels))
    health = idx.health[:n] if req.weights is None else health_column(idx.metrics[:n], req.weights)
    if req.min_health > 0:
        b.low_health = cut(health >= req.min_health)
    free = idx.capacity[:n] - idx.running[:n]
    b.full = cut(free > 0)
    slots = np.flatnonzero(cand)
    b.eligible = len(slots)
    order = draw(health[slots], free[slots], req.free_capacity, sel.count, rng or _rng)
    ids, nodes = idx.ids, replica.nodes
    return Selection([nodes[ids[slots[i]]] for i in order], b)


def draw(
    health: npt.NDArray[np.float64],
    free: npt.NDArray[np.int64],
    free_capacity: float,
    count: int,
    rng: np.random.Generator,
) -> npt.NDArray[np.intp]:
    """Indices of ``count`` items in weighted random order, without replacement.

    Efraimidis-Spirakis: item i gets the key log(u_i) / w_i (u uniform in (0, 1]); the
    largest keys win. A zero weight gets -inf, so such items come last.
    """
    if len(health) == 0:
        return np.empty(0, np.intp)
    weight = health * np.power(free.astype(np.float64), free_capacity)
    u = 1.0 - rng.random(len(weight))  # (0, 1]: log(u) is finite
    with np.errstate(divide="ignore"):
        keys = np.where(weight > 0, np.log(u) / np.where(weight > 0, weight, 1.0), -np.inf)
    if count < len(keys):
        top = np.argpartition(-keys, count - 1)[:count]
        return top[np.argsort(-keys[top], kind="stable")]
    return np.argsort(-keys, kind="stable")


def _all_of(masks: object) -> Mask:
    it = iter(masks)  # type: ignore[call-overload]
    out: Mask = next(it).copy()
    for mask in it:
        out &= mask
    return out


def list_nodes(replica: Replica, f: NodeFilter) -> list[Node]:
    """Nodes matching a filter, ordered by id so pages and diffs are stable."""
    labels = tuple(f.labels.items())
    out = [
        n
        for n in replica.candidates(f.pool_id, f.lang_pair)
        if (f.status is None or n.status is f.status)
        and not any(n.labels.get(k) != v for k, v in labels)
    ]
    out.sort(key=lambda n: n.node_id)
    return out
