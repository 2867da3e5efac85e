"""How ``registry ctl`` shows responses: aligned tables, key/value blocks, protobuf JSON.

Pure functions from messages to text, so the rendering is testable without a sidecar and
``ctl.py`` keeps to arguments, calls and exit codes. Enum values lose their prefix
(``ONLINE``, not ``NODE_STATUS_ONLINE``); times are UTC ISO 8601; empty values are ``-``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message

from registry.model import Breakdown
from registry_client import pb

NONE = "-"


def to_json(message: Message, *, indent: int | None = 2) -> str:
    """Canonical protobuf JSON (lowerCamelCase names, int64 as strings), zero values included,
    so a script finds every field of the schema; ``indent=None`` gives one line."""
    doc = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return json.dumps(doc, indent=indent)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    body = [list(row) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    lines = [list(headers), *body]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        for cells in lines
    )


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """A key/value block: keys padded to the longest one."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in pairs)


def joined(items: Iterable[str], sep: str = ",") -> str:
    text = sep.join(items)
    return text or NONE


def lang_pairs(pairs: Iterable[pb.LanguagePair]) -> str:
    return joined(f"{p.src}:{p.tgt}" for p in pairs)


def services(items: Iterable[pb.InstalledService]) -> str:
    return joined(
        s.name + (f"/{s.type}" if s.type else "") + (f"@{s.version}" if s.version else "")
        for s in items
    )


def labels(mapping: Mapping[str, str]) -> str:
    return joined(f"{k}={v}" for k, v in sorted(mapping.items()))


def node_status(status: pb.NodeStatus.ValueType) -> str:
    return pb.NodeStatus.Name(status).removeprefix("NODE_STATUS_")


def event_type(kind: pb.WatchEventType.ValueType) -> str:
    return pb.WatchEventType.Name(kind).removeprefix("WATCH_EVENT_TYPE_")


def timestamp(ms: int) -> str:
    """Milliseconds since the epoch (the registry's clock is Redis's) as UTC ISO 8601."""
    if ms <= 0:
        return NONE
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def age(ms: int, now_ms: int | None = None) -> str:
    """How long ago ``ms`` was, by this host's clock (close to Redis's on the same host)."""
    if ms <= 0:
        return NONE
    now = int(time.time() * 1000) if now_ms is None else now_ms
    seconds = max(0, now - ms) / 1000
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def jobs(node: pb.Node) -> str:
    return f"{node.running_jobs}/{node.capacity}"


def metrics(m: pb.NodeMetrics) -> str:
    names = ("cpu", "gpu", "mem", "load", "error_rate", "heartbeat_delay")
    return " ".join(f"{name}={getattr(m, name):.2f}" for name in names)


def weights(pool: pb.Pool) -> str:
    if not pool.HasField("weights"):
        return "default"
    return " ".join(
        f"{f.name}={getattr(pool.weights, f.name):g}" for f in pool.weights.DESCRIPTOR.fields
    )


def freshness(f: pb.Freshness) -> str:
    text = f"version {f.version}, staleness {f.staleness_ms} ms"
    return text + (", DEGRADED (Redis unreachable)" if f.degraded else "")


_EXCLUSIONS = tuple(
    f.name for f in dataclasses.fields(Breakdown) if f.name not in ("considered", "eligible")
)
"""SelectionBreakdown's exclusion reasons, in the order the filters apply (the model's)."""


def breakdown(b: pb.SelectionBreakdown) -> str:
    """``considered=5 eligible=2 excluded: draining=1 full=2`` (zero counts left out)."""
    text = f"considered={b.considered} eligible={b.eligible}"
    excluded = [f"{name}={getattr(b, name)}" for name in _EXCLUSIONS if getattr(b, name)]
    return text + (" excluded: " + " ".join(excluded) if excluded else "")


NODE_HEADERS = ("NODE", "STATUS", "JOBS", "HEALTH", "POOLS", "LANGS", "ADDRESS", "UPDATED")
"""UPDATED: when the node's figures last changed (a heartbeat whose metrics moved, a
registration, a reservation). Not liveness: a node beating steadily with unchanged
figures keeps an old time; STATUS says whether it is alive (ONLINE until its deadline)."""


def node_row(node: pb.Node, now_ms: int | None = None) -> list[str]:
    return [
        node.node_id,
        node_status(node.status),
        jobs(node),
        f"{node.health_score:.2f}",
        joined(node.pools),
        lang_pairs(node.lang_pairs),
        node.address or NONE,
        age(node.last_heartbeat_at, now_ms),
    ]


def nodes_table(nodes: Sequence[pb.Node]) -> str:
    if not nodes:
        return "no nodes"
    now_ms = int(time.time() * 1000)
    return table(NODE_HEADERS, (node_row(n, now_ms) for n in nodes))


def node_details(node: pb.Node, fresh: pb.Freshness | None = None) -> str:
    pairs = [
        ("node_id", node.node_id),
        ("address", node.address or NONE),
        ("status", node_status(node.status)),
        ("jobs", f"{jobs(node)} running/capacity"),
        ("health", f"{node.health_score:.2f}"),
        ("pools", joined(node.pools)),
        ("lang_pairs", lang_pairs(node.lang_pairs)),
        ("services", services(node.services)),
        ("labels", labels(node.labels)),
        ("metrics", metrics(node.metrics)),
        ("version", str(node.version)),
        ("registered_at", timestamp(node.registered_at)),
        (
            "updated",
            f"{timestamp(node.last_heartbeat_at)} ({age(node.last_heartbeat_at)})"
            if node.last_heartbeat_at
            else NONE,
        ),
        ("ttl_ms", str(node.ttl_ms)),
    ]
    if fresh is not None:
        pairs.append(("freshness", freshness(fresh)))
    return fields(pairs)


POOL_HEADERS = ("POOL", "VERSION", "LANGS", "SERVICES", "LABELS", "MIN_HEALTH", "WEIGHTS")


def pools_table(pools: Sequence[pb.Pool]) -> str:
    if not pools:
        return "no pools"
    rows = (
        [
            p.pool_id,
            str(p.version),
            lang_pairs(p.lang_pairs),
            joined(p.required_services),
            labels(p.labels),
            f"{p.min_health:g}",
            weights(p),
        ]
        for p in pools
    )
    return table(POOL_HEADERS, rows)


def pool_details(pool: pb.Pool) -> str:
    return fields(
        [
            ("pool_id", pool.pool_id),
            ("version", str(pool.version)),
            ("lang_pairs", lang_pairs(pool.lang_pairs)),
            ("required_services", joined(pool.required_services)),
            ("labels", labels(pool.labels)),
            ("min_health", f"{pool.min_health:g}"),
            ("weights", weights(pool)),
        ]
    )


def status_details(status: pb.GetStatusResponse) -> str:
    """Every GetStatus field, in the contract's order (new fields show up by themselves)."""
    pairs = []
    for field in status.DESCRIPTOR.fields:
        value = getattr(status, field.name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        pairs.append((field.name, text or NONE))
    return fields(pairs)


def selection(response: pb.SelectNodesResponse) -> str:
    picked = nodes_table(response.nodes) if response.nodes else "no eligible node"
    return f"{picked}\n{breakdown(response.breakdown)}"


def scheduled(job_id: str, response: pb.ScheduleResponse) -> str:
    node = response.node
    return fields(
        [
            ("job_id", job_id),
            ("node_id", node.node_id),
            ("address", node.address or NONE),
            ("created", "yes" if response.created else "no (the job held this slot; renewed)"),
            ("lease_until", timestamp(response.lease_deadline_ms)),
            ("jobs", f"{jobs(node)} running/capacity"),
            ("attempts", str(response.attempts)),
            ("breakdown", breakdown(response.breakdown)),
            *(
                [("buffered", "yes: granted locally while Redis is unreachable; replayed later")]
                if response.buffered
                else []
            ),
        ]
    )


def event_line(event: pb.WatchEvent) -> str:
    """One line per event: local time, type, node, version, then what the type carries."""
    clock = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    kind = event_type(event.type)
    node_id = event.node.node_id or event.node_id
    parts = [clock, kind.ljust(12), (node_id or NONE).ljust(24), f"v{event.version}"]
    if event.HasField("node"):
        node = event.node
        parts.append(f"{node_status(node.status)} jobs={jobs(node)} health={node.health_score:.2f}")
    if kind in ("SNAPSHOT_END", "BOOKMARK") and event.resume_token:
        parts.append(f"resume_token={event.resume_token}")
    return " ".join(parts)
