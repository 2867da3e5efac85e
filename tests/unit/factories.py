"""Small builders for domain objects, so a test states only what it is about.

Nodes are built the way the gateway decodes them: ``spec_json`` is the canonical JSON of
the declaration and ``service_names`` matches ``services``, so selection filters and
``node_from_fields(previous=...)`` see exactly what production code would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from registry.cache import Replica
from registry.index import EMPTY, METRIC_COLUMNS, STATUS_CODE, Key, NodeIndex, memberships
from registry.model import (
    Change,
    EventType,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeSpec,
    NodeStatus,
    Pool,
    SelectionWeights,
)

EPOCH_MS = 1_700_000_000_000


def make_node(
    node_id: str = "n1",
    *,
    pools: Iterable[str] = ("p1",),
    lang_pairs: Iterable[tuple[str, str] | LanguagePair] = (("en", "de"),),
    services: Iterable[str | InstalledService] = ("mt",),
    labels: Mapping[str, str] | None = None,
    capacity: int = 4,
    running_jobs: int = 0,
    status: NodeStatus = NodeStatus.ONLINE,
    health: float = 1.0,
    metrics: Metrics | None = None,
    version: int = 1,
    address: str | None = None,
    ttl_ms: int = 3_000,
    registered_at: int = EPOCH_MS,
    last_heartbeat_at: int | None = None,
) -> Node:
    pairs = frozenset(p if isinstance(p, LanguagePair) else LanguagePair(*p) for p in lang_pairs)
    installed = {s if isinstance(s, InstalledService) else InstalledService(s) for s in services}
    # Sorted and deduplicated like the canonical JSON, so decoding the JSON gives this tuple.
    ordered = tuple(sorted(installed, key=lambda s: (s.name, s.type, s.version)))
    spec = NodeSpec(
        node_id=node_id,
        address=address if address is not None else f"{node_id}.local:7000",
        pools=tuple(pools),
        lang_pairs=tuple(pairs),
        services=ordered,
        labels=dict(labels or {}),
        capacity=capacity,
    )
    return Node(
        node_id=node_id,
        address=spec.address,
        pools=frozenset(spec.pools),
        lang_pairs=pairs,
        services=ordered,
        labels=dict(spec.labels),
        capacity=capacity,
        status=status,
        metrics=metrics if metrics is not None else Metrics(),
        running_jobs=running_jobs,
        health_score=health,
        version=version,
        registered_at=registered_at,
        last_heartbeat_at=last_heartbeat_at if last_heartbeat_at is not None else registered_at,
        ttl_ms=ttl_ms,
        spec_json=spec.to_json(),
        service_names=frozenset(s.name for s in ordered),
    )


def evolve(node: Node, **changes: object) -> Node:
    """A copy of ``node`` with live fields changed (use make_node to change the spec)."""
    return dataclasses.replace(node, **changes)  # type: ignore[arg-type]


def put(node: Node, version: int | None = None) -> Change:
    """The log entry that stored ``node``; its version is the node's unless given."""
    if version is not None and version != node.version:
        node = evolve(node, version=version)
    return Change(node.version, EventType.PUT, node.node_id, node)


def delete(node_id: str, version: int) -> Change:
    return Change(version, EventType.DELETE, node_id, None)


def make_pool(
    pool_id: str = "p1",
    *,
    lang_pairs: Iterable[tuple[str, str] | LanguagePair] = (),
    required_services: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    min_health: float = 0.0,
    weights: SelectionWeights | None = None,
    version: int = 0,
) -> Pool:
    return Pool(
        pool_id=pool_id,
        lang_pairs=frozenset(
            p if isinstance(p, LanguagePair) else LanguagePair(*p) for p in lang_pairs
        ),
        required_services=tuple(required_services),
        labels=dict(labels or {}),
        min_health=min_health,
        weights=weights,
        version=version,
    )


def put_pool(pool: Pool, version: int | None = None) -> Change:
    """The log entry that stored ``pool``; its version is the pool's unless given."""
    if version is not None and version != pool.version:
        pool = dataclasses.replace(pool, version=version)
    return Change(pool.version, EventType.POOL, pool.pool_id, None, pool)


def replica_of(*nodes: Node, version: int | None = None, pools: Iterable[Pool] = ()) -> Replica:
    """A replica holding exactly ``nodes`` (and ``pools``), loaded as a snapshot."""
    replica = Replica()
    top = max((n.version for n in nodes), default=0)
    replica.replace_all(nodes, top if version is None else version, pools)
    return replica


def index_members(idx: NodeIndex, key: Key) -> set[str]:
    """Node ids whose slot is set in the key's mask."""
    return {idx.ids[slot] for slot in np.flatnonzero(idx.mask(key))}  # type: ignore[arg-type]


def assert_index_matches(idx: NodeIndex, nodes: Mapping[str, Node]) -> None:
    """Every column and mask says exactly what the nodes say."""
    assert len(idx) == len(nodes)
    assert {i for i in idx.ids if i} == set(nodes)
    assert int(np.count_nonzero(idx.used())) == len(nodes)
    assert len(idx.used()) == idx.size <= len(idx.status)
    expected: dict[Key, set[str]] = {}
    for node_id, node in nodes.items():
        slot = idx.slot(node_id)
        assert slot is not None
        assert idx.ids[slot] == node_id
        assert idx.status[slot] == STATUS_CODE[node.status]
        assert idx.health[slot] == node.health_score
        assert idx.running[slot] == node.running_jobs
        assert idx.capacity[slot] == node.capacity
        assert list(idx.metrics[slot]) == [getattr(node.metrics, c) for c in METRIC_COLUMNS]
        for key in memberships(node):
            expected.setdefault(key, set()).add(node_id)
    for slot, node_id in enumerate(idx.ids):
        if not node_id:
            assert idx.status[slot] == EMPTY
    # No stale membership: the sets hold exactly the live keys, and no empty set is kept.
    assert {k: {idx.ids[s] for s in v} for k, v in idx._members.items()} == expected
    for key, ids in expected.items():
        assert index_members(idx, key) == ids
