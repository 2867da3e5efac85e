"""Small builders for domain objects, so a test states only what it is about.

Nodes are built the way the gateway decodes them: ``spec_json`` is the canonical JSON of
the declaration and ``service_names`` matches ``services``, so selection filters and
``node_from_fields(previous=...)`` see exactly what production code would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from registry.cache import Replica
from registry.model import (
    Change,
    EventType,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeSpec,
    NodeStatus,
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


def replica_of(*nodes: Node, version: int | None = None) -> Replica:
    """A replica holding exactly ``nodes``, loaded as a snapshot."""
    replica = Replica()
    top = max((n.version for n in nodes), default=0)
    replica.replace_all(nodes, top if version is None else version)
    return replica
