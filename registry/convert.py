"""The protobuf edge: domain types to and from registry.v1 messages.

Decoding also rejects what protobuf itself lets through (unknown enum numbers, a
language pair with one side set); value checks live in validation.py.
"""

from __future__ import annotations

from registry.errors import InvalidArgument
from registry.model import (
    Breakdown,
    Change,
    EventType,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeFilter,
    NodeSpec,
    NodeStatus,
    Pool,
    SelectionWeights,
    Selector,
)
from registry_client.v1 import registry_pb2 as pb

_STATUS_TO_PB = {
    NodeStatus.ONLINE: pb.NODE_STATUS_ONLINE,
    NodeStatus.DRAINING: pb.NODE_STATUS_DRAINING,
    NodeStatus.OFFLINE: pb.NODE_STATUS_OFFLINE,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


def status_to_pb(status: NodeStatus | None) -> pb.NodeStatus.ValueType:
    return _STATUS_TO_PB[status] if status is not None else pb.NODE_STATUS_UNSPECIFIED


def status_from_pb(field: str, value: int) -> NodeStatus | None:
    if value == pb.NODE_STATUS_UNSPECIFIED:
        return None
    try:
        return _STATUS_FROM_PB[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(field, f"unknown NodeStatus value {value}") from None


def lang_pair_from_pb(field: str, msg: pb.LanguagePair, present: bool) -> LanguagePair | None:
    if not present or (not msg.src and not msg.tgt):
        return None
    if not msg.src or not msg.tgt:
        raise InvalidArgument(field, "src and tgt must both be set")
    return LanguagePair(msg.src, msg.tgt)


def metrics_from_pb(msg: pb.NodeMetrics) -> Metrics:
    return Metrics(msg.cpu, msg.gpu, msg.mem, msg.load, msg.error_rate)


def spec_from_pb(msg: pb.Node) -> NodeSpec:
    return NodeSpec(
        node_id=msg.node_id,
        address=msg.address,
        pools=tuple(msg.pools),
        lang_pairs=tuple(LanguagePair(p.src, p.tgt) for p in msg.lang_pairs),
        services=tuple(InstalledService(s.name, s.type, s.version) for s in msg.services),
        labels=dict(msg.labels),
        capacity=msg.capacity,
        metrics=metrics_from_pb(msg.metrics) if msg.HasField("metrics") else None,
    )


def node_to_pb(node: Node) -> pb.Node:
    m = node.metrics
    return pb.Node(
        node_id=node.node_id,
        address=node.address,
        pools=sorted(node.pools),
        lang_pairs=[
            pb.LanguagePair(src=p.src, tgt=p.tgt)
            for p in sorted(node.lang_pairs, key=lambda p: (p.src, p.tgt))
        ],
        services=[
            pb.InstalledService(name=s.name, type=s.type, version=s.version) for s in node.services
        ],
        labels=node.labels,
        capacity=node.capacity,
        status=status_to_pb(node.status),
        metrics=pb.NodeMetrics(
            cpu=m.cpu,
            gpu=m.gpu,
            mem=m.mem,
            load=m.load,
            error_rate=m.error_rate,
            heartbeat_delay=m.heartbeat_delay,
        ),
        running_jobs=node.running_jobs,
        health_score=node.health_score,
        version=node.version,
        registered_at=node.registered_at,
        last_heartbeat_at=node.last_heartbeat_at,
        ttl_ms=node.ttl_ms,
    )


def filter_from_pb(msg: pb.ListNodesRequest) -> NodeFilter:
    return NodeFilter(
        pool_id=msg.pool_id,
        lang_pair=lang_pair_from_pb("lang_pair", msg.lang_pair, msg.HasField("lang_pair")),
        status=status_from_pb("status", msg.status),
        labels=dict(msg.labels),
    )


def selector_from_pb(msg: pb.SelectNodesRequest) -> Selector:
    return Selector(
        pool_id=msg.pool_id,
        lang_pair=lang_pair_from_pb("lang_pair", msg.lang_pair, msg.HasField("lang_pair")),
        required_services=tuple(msg.required_services),
        labels=dict(msg.labels),
        count=msg.count or 1,
        exclude_node_ids=frozenset(msg.exclude_node_ids),
        min_health=msg.min_health,
    )


def breakdown_to_pb(b: Breakdown) -> pb.SelectionBreakdown:
    return pb.SelectionBreakdown(
        considered=b.considered,
        excluded_id=b.excluded_id,
        offline=b.offline,
        draining=b.draining,
        wrong_pool=b.wrong_pool,
        wrong_lang_pair=b.wrong_lang_pair,
        missing_service=b.missing_service,
        labels=b.labels,
        low_health=b.low_health,
        full=b.full,
        eligible=b.eligible,
    )


def change_to_pb(change: Change, token: str) -> pb.WatchEvent:
    if change.type is EventType.DELETE or change.node is None:
        return pb.WatchEvent(
            type=pb.WATCH_EVENT_TYPE_DELETE,
            node_id=change.node_id,
            version=change.version,
            resume_token=token,
        )
    return pb.WatchEvent(
        type=pb.WATCH_EVENT_TYPE_PUT,
        node=node_to_pb(change.node),
        node_id=change.node_id,
        version=change.version,
        resume_token=token,
    )


def _pairs_to_pb(pairs: frozenset[LanguagePair]) -> list[pb.LanguagePair]:
    return [
        pb.LanguagePair(src=p.src, tgt=p.tgt) for p in sorted(pairs, key=lambda p: (p.src, p.tgt))
    ]


def weights_from_pb(msg: pb.SelectionWeights) -> SelectionWeights:
    return SelectionWeights(
        cpu=msg.cpu,
        gpu=msg.gpu,
        mem=msg.mem,
        load=msg.load,
        heartbeat_delay=msg.heartbeat_delay,
        error_rate=msg.error_rate,
        free_capacity=msg.free_capacity,
    )


def pool_from_pb(msg: pb.Pool) -> Pool:
    return Pool(
        pool_id=msg.pool_id,
        lang_pairs=frozenset(LanguagePair(p.src, p.tgt) for p in msg.lang_pairs),
        required_services=tuple(msg.required_services),
        labels=dict(msg.labels),
        min_health=msg.min_health,
        weights=weights_from_pb(msg.weights) if msg.HasField("weights") else None,
    )


def pool_to_pb(pool: Pool) -> pb.Pool:
    msg = pb.Pool(
        pool_id=pool.pool_id,
        lang_pairs=_pairs_to_pb(pool.lang_pairs),
        required_services=sorted(pool.required_services),
        labels=pool.labels,
        min_health=pool.min_health,
        version=pool.version,
    )
    if pool.weights is not None:
        w = pool.weights
        msg.weights.CopyFrom(
            pb.SelectionWeights(
                cpu=w.cpu,
                gpu=w.gpu,
                mem=w.mem,
                load=w.load,
                heartbeat_delay=w.heartbeat_delay,
                error_rate=w.error_rate,
                free_capacity=w.free_capacity,
            )
        )
    return msg
