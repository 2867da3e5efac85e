"""Typed writes: one frozen command per write RPC, run by the live path and the replay.

A servicer handler builds a command and hands it to ``Degradation.write``; the same
object's ``run`` sends it to Redis now, or later from the write buffer, or after a
restart from the journal (``to_record``/``from_record``). A new write RPC therefore
cannot be forgotten in the replay: without a command it has nothing to hand over.

``keys`` names what a command touches (``node:<id>``, ``job:<id>``, ``pool:<id>``): a live
write waits for buffered writes with a key in common, so writes to one node, job or pool
reach Redis in the order they were acknowledged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from registry.model import (
    HeartbeatIn,
    HeartbeatResult,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeSpec,
    Pool,
    Release,
    Reservation,
)

R = TypeVar("R")
Record = dict[str, Any]


class Writes(Protocol):
    """What the commands need of the gateway (a fake in unit tests)."""

    async def register(
        self, spec: NodeSpec, ttl_ms: int, *, adopt_ms: int = 0
    ) -> tuple[Node, bool]: ...

    async def deregister(self, node_id: str) -> tuple[bool, int]: ...

    async def drain(self, node_id: str) -> tuple[Node, bool]: ...

    async def release(self, node_id: str, job_id: str) -> Release: ...

    async def reserve(
        self, node_id: str, job_id: str, lease_ms: int, *, replay: bool = False
    ) -> Reservation: ...

    async def put_pool(self, pool: Pool) -> tuple[Pool, bool]: ...

    async def heartbeat(self, hb: HeartbeatIn) -> HeartbeatResult: ...


class Command(ABC, Generic[R]):
    kind: ClassVar[str]
    """Its name in metrics, logs and the journal."""

    @property
    @abstractmethod
    def keys(self) -> tuple[str, ...]: ...

    @abstractmethod
    async def run(self, gw: Writes) -> R: ...

    @abstractmethod
    def to_record(self) -> Record: ...


@dataclass(frozen=True, slots=True)
class Register(Command[tuple[Node, bool]]):
    kind: ClassVar[str] = "register"
    spec: NodeSpec
    ttl_ms: int
    adopt_ms: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"node:{self.spec.node_id}",)

    async def run(self, gw: Writes) -> tuple[Node, bool]:
        return await gw.register(self.spec, self.ttl_ms, adopt_ms=self.adopt_ms)

    def to_record(self) -> Record:
        s = self.spec
        return {
            "node_id": s.node_id,
            "address": s.address,
            "pools": list(s.pools),
            "lang_pairs": [[p.src, p.tgt] for p in s.lang_pairs],
            "services": [[v.name, v.type, v.version] for v in s.services],
            "labels": dict(s.labels),
            "capacity": s.capacity,
            "metrics": None if s.metrics is None else metrics_record(s.metrics),
            "ttl_ms": self.ttl_ms,
            "adopt_ms": self.adopt_ms,
        }

    @classmethod
    def from_record(cls, r: Record) -> Register:
        spec = NodeSpec(
            node_id=r["node_id"],
            address=r["address"],
            pools=tuple(r["pools"]),
            lang_pairs=tuple(LanguagePair(s, t) for s, t in r["lang_pairs"]),
            services=tuple(InstalledService(n, t, v) for n, t, v in r["services"]),
            labels=dict(r["labels"]),
            capacity=int(r["capacity"]),
            metrics=None if r.get("metrics") is None else metrics_from_record(r["metrics"]),
        )
        return cls(spec, int(r["ttl_ms"]), int(r.get("adopt_ms", 0)))


@dataclass(frozen=True, slots=True)
class Deregister(Command[tuple[bool, int]]):
    kind: ClassVar[str] = "deregister"
    node_id: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"node:{self.node_id}",)

    async def run(self, gw: Writes) -> tuple[bool, int]:
        return await gw.deregister(self.node_id)

    def to_record(self) -> Record:
        return {"node_id": self.node_id}

    @classmethod
    def from_record(cls, r: Record) -> Deregister:
        return cls(r["node_id"])


@dataclass(frozen=True, slots=True)
class Drain(Command[tuple[Node, bool]]):
    kind: ClassVar[str] = "drain"
    node_id: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"node:{self.node_id}",)

    async def run(self, gw: Writes) -> tuple[Node, bool]:
        return await gw.drain(self.node_id)

    def to_record(self) -> Record:
        return {"node_id": self.node_id}

    @classmethod
    def from_record(cls, r: Record) -> Drain:
        return cls(r["node_id"])


@dataclass(frozen=True, slots=True)
class ReleaseSlot(Command[Release]):
    kind: ClassVar[str] = "release"
    node_id: str
    job_id: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"node:{self.node_id}", f"job:{self.job_id}")

    async def run(self, gw: Writes) -> Release:
        return await gw.release(self.node_id, self.job_id)

    def to_record(self) -> Record:
        return {"node_id": self.node_id, "job_id": self.job_id}

    @classmethod
    def from_record(cls, r: Record) -> ReleaseSlot:
        return cls(r["node_id"], r["job_id"])


@dataclass(frozen=True, slots=True)
class ReserveLocal(Command[Reservation]):
    """A slot granted from the local view while degraded (policy ``local``): its replay
    records it even on a node that filled up meanwhile, since it was acknowledged."""

    kind: ClassVar[str] = "reserve"
    node_id: str
    job_id: str
    lease_ms: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"node:{self.node_id}", f"job:{self.job_id}")

    async def run(self, gw: Writes) -> Reservation:
        return await gw.reserve(self.node_id, self.job_id, self.lease_ms, replay=True)

    def to_record(self) -> Record:
        return {"node_id": self.node_id, "job_id": self.job_id, "lease_ms": self.lease_ms}

    @classmethod
    def from_record(cls, r: Record) -> ReserveLocal:
        return cls(r["node_id"], r["job_id"], int(r["lease_ms"]))


@dataclass(frozen=True, slots=True)
class PutPool(Command[tuple[Pool, bool]]):
    kind: ClassVar[str] = "put_pool"
    pool: Pool

    @property
    def keys(self) -> tuple[str, ...]:
        return (f"pool:{self.pool.pool_id}",)

    async def run(self, gw: Writes) -> tuple[Pool, bool]:
        return await gw.put_pool(self.pool)

    def to_record(self) -> Record:
        return {"pool_id": self.pool.pool_id, "spec": self.pool.to_json()}

    @classmethod
    def from_record(cls, r: Record) -> PutPool:
        return cls(Pool.from_json(r["pool_id"], r["spec"], 0))


COMMANDS: dict[str, Any] = {
    c.kind: c for c in (Register, Deregister, Drain, ReleaseSlot, ReserveLocal, PutPool)
}
"""kind -> command class, for the journal."""


def command_from_record(kind: str, record: Record) -> Command[Any]:
    cls = COMMANDS[kind]
    command: Command[Any] = cls.from_record(record)
    return command


def metrics_record(m: Metrics) -> list[float]:
    return [m.cpu, m.gpu, m.mem, m.load, m.error_rate]


def metrics_from_record(values: list[float]) -> Metrics:
    cpu, gpu, mem, load, err = values
    return Metrics(cpu=cpu, gpu=gpu, mem=mem, load=load, error_rate=err)


def heartbeat_record(hb: HeartbeatIn) -> Record:
    return {
        "node_id": hb.node_id,
        "m": metrics_record(hb.metrics),
        "jobs": None if hb.running_job_ids is None else list(hb.running_job_ids),
    }


def heartbeat_from_record(r: Record) -> HeartbeatIn:
    jobs = r.get("jobs")
    return HeartbeatIn(
        r["node_id"], metrics_from_record(r["m"]), None if jobs is None else tuple(jobs)
    )
