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
    health_score: float


class HeartbeatOutcome(enum.Enum):
    OK = 1
    UNKNOWN = 0
    OFFLINE = 2


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    outcome: HeartbeatOutcome
    version: int = 0
    status: NodeStatus | None = None
    deadline_ms: int = 0
    changed: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    node: Node
    created: bool
    lease_deadline_ms: int


@dataclass(frozen=True, slots=True)
class Release:
    released: bool
    node: Node | None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "del"


@dataclass(frozen=True, slots=True)
class Change:
    """One change-log entry: what happened to which node at which registry version."""

    version: int
    type: EventType
    node_id: str
    node: Node | None


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
