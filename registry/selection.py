"""Node selection: filters, ranking and the breakdown of why nodes were excluded.

Pool and language pair are answered by the replica's indexes; their counts in the
breakdown come from index sizes, so a selection touches only the nodes that match both.
Each remaining node is counted once, under the first filter that removes it, in this
order: excluded id, offline, draining, missing service, labels, low health, full.

Ranking: a score from health and free capacity, with a random tie-break among nodes
whose scores fall in the same band, so schedulers sharing one view do not all pick the
same top node.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable
from dataclasses import dataclass

from registry.cache import Replica
from registry.model import Node, NodeFilter, NodeStatus, Selector

HEALTH_WEIGHT = 0.7
FREE_WEIGHT = 0.3
BAND = 0.05
"""Scores within one band are near-equal: their order is random."""


@dataclass(slots=True)
class Breakdown:
    considered: int = 0
    wrong_pool: int = 0
    wrong_lang_pair: int = 0
    excluded_id: int = 0
    offline: int = 0
    draining: int = 0
    missing_service: int = 0
    labels: int = 0
    low_health: int = 0
    full: int = 0
    eligible: int = 0


@dataclass(frozen=True, slots=True)
class Selection:
    nodes: list[Node]
    breakdown: Breakdown


def score(node: Node) -> float:
    free = node.free_slots / node.capacity if node.capacity > 0 else 0.0
    return HEALTH_WEIGHT * node.health_score + FREE_WEIGHT * free


def select(replica: Replica, sel: Selector, rng: random.Random | None = None) -> Selection:
    b = Breakdown(considered=len(replica))
    pool_size = len(replica.by_pool.get(sel.pool_id, ())) if sel.pool_id else b.considered
    b.wrong_pool = b.considered - pool_size
    candidates = replica.candidates(sel.pool_id, sel.lang_pair)
    if not isinstance(candidates, list):
        candidates = list(candidates)
    b.wrong_lang_pair = pool_size - len(candidates)
    excluded = sel.exclude_node_ids
    required = frozenset(sel.required_services)
    labels = tuple(sel.labels.items())
    min_health = sel.min_health
    online = NodeStatus.ONLINE
    offline = NodeStatus.OFFLINE
    eligible: list[Node] = []
    for node in candidates:
        if node.node_id in excluded:
            b.excluded_id += 1
        elif node.status is not online:
            if node.status is offline:
                b.offline += 1
            else:
                b.draining += 1
        elif required and not required <= node.service_names:
            b.missing_service += 1
        elif labels and any(node.labels.get(k) != v for k, v in labels):
            b.labels += 1
        elif node.health_score < min_health:
            b.low_health += 1
        elif node.running_jobs >= node.capacity:
            b.full += 1
        else:
            eligible.append(node)
    b.eligible = len(eligible)
    draw = (rng or random).random
    ranked = heapq.nsmallest(sel.count, eligible, key=lambda n: (-int(score(n) / BAND), draw()))
    return Selection(ranked, b)


def list_nodes(replica: Replica, f: NodeFilter) -> list[Node]:
    """Nodes matching a filter, ordered by id so pages and diffs are stable."""
    nodes: Iterable[Node] = replica.candidates(f.pool_id, f.lang_pair)
    labels = tuple(f.labels.items())
    out = [
        n
        for n in nodes
        if (f.status is None or n.status is f.status)
        and not any(n.labels.get(k) != v for k, v in labels)
    ]
    out.sort(key=lambda n: n.node_id)
    return out
