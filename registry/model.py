"""Domain types. Plain frozen dataclasses: protobuf stays at the edge (convert.py)."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field


class NodeStatus(enum.Enum):
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


@dataclass(frozen=True, slots=True)
class LanguagePair:
    src: str
    tgt: str


@dataclass(frozen=True, slots=True)
class InstalledService:
    name: str
    type: str = ""
    version: str = ""


@dataclass(frozen=True, slots=True)
class Metrics:
    """Load figures, each a fraction in [0, 1]."""

    cpu: float = 0.0
    gpu: float = 0.0
    mem: float = 0.0
    load: float = 0.0
    error_rate: float = 0.0
    heartbeat_delay: float = 0.0
    """Computed by the registry: lateness of the last heartbeat, a fraction of its interval."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What a node declares when it registers: everything but its live state."""

    node_id: str
    address: str = ""
    pools: tuple[str, ...] = ()
    lang_pairs: tuple[LanguagePair, ...] = ()
    services: tuple[InstalledService, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: int = 0
    metrics: Metrics | None = None
    """Load figures declared at registration (None: not given). Live state, not part of
    the spec: a heartbeat replaces them."""

    def to_json(self) -> str:
        """Canonical JSON of the declared fields but id and capacity (stored separately).

        Canonical (sorted, deduplicated, compact) so that registering the same node
        twice yields the same bytes and the script can tell nothing changed.
        """
        doc = {
            "address": self.address,
            "pools": sorted(set(self.pools)),
            "lang_pairs": sorted({(p.src, p.tgt) for p in self.lang_pairs}),
            "services": sorted({(s.name, s.type, s.version) for s in self.services}),
            "labels": dict(sorted(self.labels.items())),
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Node:
    """A node as the registry stores it: declaration plus live state."""

    node_id: str
    address: str
    pools: frozenset[str]
    lang_pairs: frozenset[LanguagePair]
    services: tuple[InstalledService, ...]
    labels: Mapping[str, str]
    capacity: int
    status: NodeStatus
    metrics: Metrics
    running_jobs: int
    health_score: float
    version: int
    registered_at: int
    last_heartbeat_at: int
    ttl_ms: int
    spec_json: str = field(default="", compare=False, repr=False)
    service_names: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def free_slots(self) -> int:
        return max(self.capacity - self.running_jobs, 0)


@dataclass(frozen=True, slots=True)
class HeartbeatIn:
    node_id: str
    metrics: Metrics
    running_job_ids: tuple[str, ...] | None = None
    """The jobs the node runs now, for reconciliation; None when it did not report."""


class HeartbeatOutcome(enum.Enum):
    OK = 1
    UNKNOWN = 0
    OFFLINE = 2
    BUFFERED = 3
    """Redis unreachable: held by the sidecar, replayed on recovery."""


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    outcome: HeartbeatOutcome
    version: int = 0
    status: NodeStatus | None = None
    deadline_ms: int = 0
    changed: bool = False
    ttl_ms: int = 0
    released_job_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    node: Node
    created: bool
    lease_deadline_ms: int
    buffered: bool = False
    """Granted from the local view while Redis was unreachable; replayed on recovery."""


@dataclass(slots=True)
class Breakdown:
    """Why a selection excluded nodes: each node counted once, under the first reason.

    Order: wrong_pool, wrong_lang_pair, excluded_id, offline, draining, missing_service,
    labels, low_health, full; ``considered`` is every node, so the fields add up to it.
    """

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
class Scheduled:
    reservation: Reservation
    attempts: int
    breakdown: Breakdown


@dataclass(frozen=True, slots=True)
class Release:
    released: bool
    node: Node | None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "del"
    POOL = "pool"
    """A pool's configuration changed; not a node event, so watchers never see it."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry: what happened to which node at which registry version."""

    version: int
    type: EventType
    node_id: str
    """The node's id, or the pool's for a POOL change."""
    node: Node | None
    pool: Pool | None = None


@dataclass(frozen=True, slots=True)
class SelectionWeights:
    """Relative health weights, and how strongly free capacity draws jobs.

    A node's health is 1 minus the weighted mean of its six load figures; a candidate is
    drawn with probability proportional to ``health * free_slots ** free_capacity``.
    """

    cpu: float = 0.2
    gpu: float = 0.15
    mem: float = 0.15
    load: float = 0.15
    heartbeat_delay: float = 0.1
    error_rate: float = 0.25
    free_capacity: float = 1.0

    def health_vector(self) -> tuple[float, float, float, float, float, float]:
        """In the order of the metric columns: cpu, gpu, mem, load, delay, error rate."""
        return (self.cpu, self.gpu, self.mem, self.load, self.heartbeat_delay, self.error_rate)


DEFAULT_WEIGHTS = SelectionWeights()


@dataclass(frozen=True, slots=True)
class Pool:
    """A pool's configuration. Members are the nodes that declare the pool."""

    pool_id: str
    lang_pairs: frozenset[LanguagePair] = frozenset()
    required_services: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    min_health: float = 0.0
    weights: SelectionWeights | None = None
    """None: the sidecar's default weights."""
    version: int = 0

    def to_json(self) -> str:
        """Canonical JSON of the configuration (version excluded), compared by put_pool."""
        doc = {
            "lang_pairs": sorted({(p.src, p.tgt) for p in self.lang_pairs}),
            "required_services": sorted(set(self.required_services)),
            "labels": dict(sorted(self.labels.items())),
            "min_health": self.min_health,
            "weights": None
            if self.weights is None
            else {
                "cpu": self.weights.cpu,
                "gpu": self.weights.gpu,
                "mem": self.weights.mem,
                "load": self.weights.load,
                "heartbeat_delay": self.weights.heartbeat_delay,
                "error_rate": self.weights.error_rate,
                "free_capacity": self.weights.free_capacity,
            },
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, pool_id: str, text: str, version: int) -> Pool:
        doc = json.loads(text)
        weights = doc.get("weights")
        return cls(
            pool_id=pool_id,
            lang_pairs=frozenset(LanguagePair(s, t) for s, t in doc.get("lang_pairs", ())),
            required_services=tuple(doc.get("required_services", ())),
            labels=dict(doc.get("labels", {})),
            min_health=float(doc.get("min_health", 0.0)),
            weights=None if weights is None else SelectionWeights(**weights),
            version=version,
        )


@dataclass(frozen=True, slots=True)
class NodeFilter:
    """Filters shared by ListNodes and SelectNodes; empty fields match everything."""

    pool_id: str = ""
    lang_pair: LanguagePair | None = None
    status: NodeStatus | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Selector:
    pool_id: str = ""
    lang_pair: LanguagePair | None = None
    required_services: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    count: int = 1
    exclude_node_ids: frozenset[str] = frozenset()
    min_health: float = 0.0
