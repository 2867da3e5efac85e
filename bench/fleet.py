"""A realistic fleet, not a closed loop: N nodes heartbeating on a schedule into two
sidecars that share one Redis, while a few callers keep selecting nodes.

- Nodes: ``nodes`` simulated nodes (default 10,000), one bidirectional Heartbeat stream
  each, ``streams_per_channel`` streams per gRPC channel (HTTP/2 connection); half the
  nodes stream to each sidecar. Every node is registered first (RegisterNode, pipelined
  with bounded concurrency, outside the measured window) with a 9 s TTL, so the sidecar
  suggests a 3 s interval (a third of the TTL). Each node then beats every ``interval_ms``
  (3 s) on a fixed schedule, the first beat of each node spread uniformly over one
  interval so the load is smooth. A response whose ``interval_ms`` is larger than that is
  the sidecar's backpressure signal: the node waits that long before its next beat (the
  largest interval seen is reported). A node that is told ``HEARTBEAT_ACTION_REGISTER``
  registers again, as a real node would. Metrics jitter below the sidecar's epsilon on
  every beat; a fraction ``material`` (2 %) of beats also moves one metric materially.
- The heartbeat load generator runs in one worker process; ``callers`` SelectNodes
  callers (closed loop, ``think_ms`` between calls, ``count=3`` over the pool every node
  is in, alternating between the two sidecars) run in another.
- Measured after a warm-up: acks by action and their rate, ack latency (write of a beat
  to the response with its seq), the generator's send lag (how late it wrote versus the
  schedule: a late generator must not pass for a fast sidecar), SelectNodes latency and
  rate, each sidecar's GetStatus degraded-mode counters (before the run, at the start
  and end of the measured window, sampled every second in between), CPU of every
  process, RSS of each sidecar.
- Baseline, in the same run: the same generator and callers against two bare grpc.aio
  echo servers (``bench/echo.py``, answering every beat and a canned copy of a real
  SelectNodes response), so ratios isolate what the registry costs. The echo answers a
  fixed ``interval_ms`` of 3333, which the generator records but does not follow (it is
  no backpressure).
- Targets: no BUFFERED ack and no degraded-mode transition (over the whole run,
  registration and warm-up included), every heartbeat answered, ack p99 < 20 ms and
  SelectNodes p99 < 10 ms in the measured window. ``sweep`` runs several fleet sizes and
  reports the largest that met them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from bench import harness
from bench.harness import Gate, LoadWorkers, Result, ServerProcess, ServerSpec
from bench.heartbeat import NodeLoad
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    Stub = pb_grpc.RegistryServiceAsyncStub

NAMESPACE = "fleet"
POOL = "fleet"
NODE_TTL_MS = 9_000
"""The sidecar suggests a third of the node's TTL as its interval: 3,000 ms."""
MAX_IN_FLIGHT = 4
"""Beats a node may have unanswered; a beat due beyond that is skipped (and counted)."""
REGISTER_CONCURRENCY = 32
"""RegisterNode calls in flight per sidecar while the fleet registers."""
ANSWER_GRACE_S = 5.0
"""After the window a stream waits this long for its last answers; the rest are unanswered."""
OPEN_CONCURRENCY = 256
"""Streams opened at once before the run."""
RECONNECT_S = 1.0
"""A node whose stream failed opens a new one after this long."""
RPC_TIMEOUT_S = 10.0
SAMPLE_S = 1.0
"""GetStatus of each sidecar is sampled this often during the measured window."""
SEND_LAG_WARN_MS = 50.0
"""Above this send-lag p99 the generator could not keep its schedule: a warning."""
TARGETS = (
    "buffered_acks==0",
    "degraded_transitions==0",
    "all_answered",
    "ack_p99<20ms",
    "select_p99<10ms",
)
STATUS_FIELDS = (
    "mode_transitions",
    "outages",
    "buffered_heartbeats",
    "buffered_writes",
    "buffer_refused",
    "degraded_ms",
    "last_outage_ms",
    "rebuilds",
    "reloads",
    "heartbeat_streams",
    "node_count",
    "redis_latency_p50_us",
    "redis_latency_p99_us",
)
ACTIONS: dict[int, str] = {
    pb.HEARTBEAT_ACTION_CONTINUE: "CONTINUE",
    pb.HEARTBEAT_ACTION_BUFFERED: "BUFFERED",
    pb.HEARTBEAT_ACTION_REGISTER: "REGISTER",
}


@dataclass(frozen=True)
class Plan:
    nodes: int = 10_000
    sidecars: int = 2
    interval_ms: int = 3_000
    warmup_s: float = 6.0
    """Two intervals: every stream has started and beaten at least once before the window."""
    duration_s: float = 30.0
    material: float = 0.02
    callers: int = 4
    think_ms: float = 20.0
    select_count: int = 3
    streams_per_channel: int = 500
    sweep: tuple[int, ...] = field(default_factory=tuple)
    """Fleet sizes to run one after another (empty: ``nodes`` only)."""
    seed: int = 11
    freeze_at_s: float | None = None
    """A fault run: this long into the measured window Redis is frozen (SIGSTOP) for
    ``freeze_s`` while the load goes on; how soon each sidecar noticed is reported."""
    freeze_s: float = 2.0


# --------------------------------------------------------------------------- heartbeat load


class Recorder:
    """One sidecar's (or echo server's) share of the fleet: acks inside [start, end)
    (set once the start time is known)."""

    def __init__(self, start: float = math.inf, end: float = math.inf) -> None:
        self.start, self.end = start, end
        self.actions: Counter[str] = Counter()
        self.warmup_actions: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.send_lag: list[float] = []
        self.sent_window = 0
        self.sent_total = 0
        self.skipped = 0
        self.unanswered = 0
        self.stream_errors: Counter[str] = Counter()
        self.error_details: Counter[str] = Counter()
        self.open_failures = 0
        self.max_interval_ms = 0
        self.raised_interval_acks = 0
        self.reregistered = 0
        self.register_errors: Counter[str] = Counter()
        self.material = 0

    def ack(self, latency: float, now: float, action: int) -> None:
        name = ACTIONS.get(action, str(action))
        if self.start <= now < self.end:
            self.actions[name] += 1
            self.latencies.append(latency)
        elif now < self.start:
            self.warmup_actions[name] += 1


def _register_request(node_id: str) -> pb.RegisterNodeRequest:
    return pb.RegisterNodeRequest(
        node=pb.Node(
            node_id=node_id,
            address=f"{node_id}.fleet:7000",
            pools=[POOL],
            lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
            capacity=8,
        ),
        ttl_ms=NODE_TTL_MS,
    )


class Node:
    """One simulated node: its heartbeat stream (reopened when it fails), its schedule
    (base interval, or the sidecar's larger one) and its re-registration."""

    def __init__(
        self,
        stub: Stub,
        load: NodeLoad,
        rec: Recorder,
        *,
        base_s: float,
        honour_interval: bool,
        can_register: bool,
    ) -> None:
        self.stub = stub
        self.load = load
        self.rec = rec
        self.base_s = base_s
        self.interval_s = base_s
        self.honour = honour_interval
        self.can_register = can_register
        self.registering: asyncio.Task[None] | None = None
        self.seq = 0
        self.call: Any = None

    async def open(self) -> None:
        """Open the stream ahead of the run (a fleet's streams are long-lived); one that
        fails to open (gRPC cancels a few of thousands opened at once, against the echo
        server too) is counted and opened again at the node's first beat."""
        self.call = self.stub.Heartbeat(None)
        try:
            await asyncio.wait_for(self.call.wait_for_connection(), RPC_TIMEOUT_S)
        except (grpc.RpcError, TimeoutError):
            self.call.cancel()
            self.call = None
            self.rec.open_failures += 1

    async def run(self, start_at: float) -> None:
        rec = self.rec
        await harness.sleep_until(start_at)
        due = start_at
        while due < rec.end:
            due = await self._stream(due)
        if self.registering is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.registering, RPC_TIMEOUT_S)

    async def _stream(self, due: float) -> float:
        """Beat on one stream until the window ends or the stream fails; the next due time."""
        rec = self.rec
        call, self.call = self.call or self.stub.Heartbeat(None), None
        sent: dict[int, float] = {}
        reading = asyncio.create_task(self._read(call, sent))
        try:
            while due < rec.end:
                await harness.sleep_until(due)
                if reading.done():
                    raise ConnectionError("stream ended by the server")
                if len(sent) >= MAX_IN_FLIGHT:
                    rec.skipped += 1
                else:
                    self.seq += 1
                    req = self.load.request(self.seq)
                    now = time.monotonic()
                    sent[self.seq] = now
                    rec.sent_total += 1
                    if now >= rec.start:
                        rec.sent_window += 1
                        rec.send_lag.append(now - due)
                    await call.write(req)
                due += self.interval_s
            await call.done_writing()
            try:
                await asyncio.wait_for(asyncio.shield(reading), ANSWER_GRACE_S)
            except TimeoutError:
                rec.unanswered += len(sent)
            return due
        except (grpc.RpcError, asyncio.InvalidStateError, ConnectionError) as exc:
            code, details = None, str(exc)
            with contextlib.suppress(Exception):
                if call.done():
                    code = await asyncio.wait_for(call.code(), 1.0)
                    details = await asyncio.wait_for(call.details(), 1.0)
            name = str(code) if code is not None else type(exc).__name__
            rec.stream_errors[name] += 1
            if len(rec.error_details) < 10 or f"{name}: {details}"[:160] in rec.error_details:
                rec.error_details[f"{name}: {details}"[:160]] += 1
            rec.unanswered += len(sent)
            return max(due, time.monotonic() + RECONNECT_S)
        finally:
            reading.cancel()
            call.cancel()
            with contextlib.suppress(BaseException):
                await reading

    async def _read(self, call: Any, sent: dict[int, float]) -> None:
        rec = self.rec
        with contextlib.suppress(grpc.RpcError):
            while True:
                resp = await call.read()
                if not isinstance(resp, pb.HeartbeatResponse):  # grpc.aio.EOF
                    return
                now = time.monotonic()
                at = sent.pop(resp.seq, None)
                if at is None:
                    continue
                rec.ack(now - at, now, resp.action)
                interval_ms = resp.interval_ms
                if interval_ms > rec.max_interval_ms:
                    rec.max_interval_ms = interval_ms
                if interval_ms > self.base_s * 1000:
                    rec.raised_interval_acks += 1
                if self.honour:
                    self.interval_s = max(self.base_s, interval_ms / 1000)
                if (
                    resp.action == pb.HEARTBEAT_ACTION_REGISTER
                    and self.can_register
                    and (self.registering is None or self.registering.done())
                ):
                    self.registering = asyncio.create_task(self._register())

    async def _register(self) -> None:
        try:
            await self.stub.RegisterNode(
                _register_request(self.load.node_id), timeout=RPC_TIMEOUT_S
            )
            self.rec.reregistered += 1
        except grpc.RpcError as exc:
            self.rec.register_errors[str(exc.code())] += 1


async def _register_all(
    stubs: Sequence[Stub], node_ids: Sequence[str], done: list[str]
) -> Counter[str]:
    """Register ``node_ids`` through ``stubs`` (one sidecar's channels), bounded; appends
    each id to ``done`` as it completes (the order start times are handed out in)."""
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)
    errors: Counter[str] = Counter()

    async def one(i: int, node_id: str) -> None:
        async with limit:
            try:
                await stubs[i % len(stubs)].RegisterNode(
                    _register_request(node_id), timeout=RPC_TIMEOUT_S
                )
            except grpc.RpcError as exc:
                errors[str(exc.code())] += 1
            done.append(node_id)

    await asyncio.gather(*(one(i, n) for i, n in enumerate(node_ids)))
    return errors


def _summary(rec: Recorder, duration_s: float) -> Result:
    acks = sum(rec.actions.values())
    return {
        "acks": acks,
        "rate": acks / duration_s,
        "offered_rate": rec.sent_window / duration_s,
        "actions": {name: rec.actions.get(name, 0) for name in ACTIONS.values()},
        "warmup_actions": {name: rec.warmup_actions.get(name, 0) for name in ACTIONS.values()},
        "latency": harness.latency_summary(rec.latencies),
        "send_lag": harness.latency_summary(rec.send_lag),
        "sent_window": rec.sent_window,
        "sent_total": rec.sent_total,
        "skipped": rec.skipped,
        "unanswered": rec.unanswered,
        "stream_errors": dict(rec.stream_errors),
        "error_details": dict(rec.error_details),
        "open_failures": rec.open_failures,
        "max_interval_ms": rec.max_interval_ms,
        "raised_interval_acks": rec.raised_interval_acks,
        "reregistered": rec.reregistered,
        "register_errors": dict(rec.register_errors),
        "material_fraction": rec.material / max(rec.sent_total, 1),
    }


async def beat_fleet(
    gate: Gate,
    *,
    addresses: list[str],
    node_ids: list[list[str]],
    register: bool,
    honour_interval: bool,
    interval_ms: int,
    streams_per_channel: int,
    warmup_s: float,
    duration_s: float,
    material: float,
    seed: int,
) -> Result:
    """Heartbeat load job (one worker process): ``node_ids[i]`` stream to ``addresses[i]``."""
    rng = random.Random(seed)
    options = [("grpc.use_local_subchannel_pool", 1)]
    chans: list[list[grpc.aio.Channel]] = [
        [
            grpc.aio.insecure_channel(addr, options=options)
            for _ in range(max(1, math.ceil(len(ids) / streams_per_channel)))
        ]
        for addr, ids in zip(addresses, node_ids, strict=True)
    ]
    try:
        stubs: list[list[Stub]] = [[pb_grpc.RegistryServiceStub(c) for c in cs] for cs in chans]
        for cs in chans:
            for c in cs:
                await asyncio.wait_for(c.channel_ready(), 10)
        recs = [Recorder() for _ in addresses]
        base_s = interval_ms / 1000
        nodes: dict[str, Node] = {}
        loads: list[list[NodeLoad]] = [[] for _ in addresses]
        for t, ids in enumerate(node_ids):
            for i, node_id in enumerate(ids):
                load = NodeLoad(node_id, random.Random(rng.random()), material)
                loads[t].append(load)
                nodes[node_id] = Node(
                    stubs[t][i % len(stubs[t])],
                    load,
                    recs[t],
                    base_s=base_s,
                    honour_interval=honour_interval,
                    can_register=register,
                )
        t0 = time.monotonic()
        opening = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def open_one(node: Node) -> None:
            async with opening:
                await node.open()

        await asyncio.gather(*(open_one(n) for n in nodes.values()))
        open_s = time.monotonic() - t0
        order: list[str] = []
        reg_errors: Counter[str] = Counter()
        t0 = time.monotonic()
        if register:
            for errs in await asyncio.gather(
                *(_register_all(s, ids, order) for s, ids in zip(stubs, node_ids, strict=True))
            ):
                reg_errors.update(errs)
        else:
            order = [n for ids in node_ids for n in ids]
        register_s = time.monotonic() - t0
        go_at = await gate.ready()
        start = go_at + warmup_s
        end = start + duration_s
        for rec in recs:
            rec.start, rec.end = start, end
        # Start times uniform over one interval, handed out in registration order, so no
        # node waits much longer than the registration took before its first beat.
        offsets = sorted(rng.uniform(0, base_s) for _ in order)
        starts = dict(zip(order, offsets, strict=True))
        cpu: list[float] = []

        async def meter() -> None:
            await harness.sleep_until(start)
            cpu.append(time.process_time())
            await harness.sleep_until(end)
            cpu.append(time.process_time())

        metering = asyncio.create_task(meter())
        await asyncio.wait_for(
            asyncio.gather(*(node.run(go_at + starts[i]) for i, node in nodes.items())),
            warmup_s + duration_s + ANSWER_GRACE_S + 2 * RPC_TIMEOUT_S + 30,
        )
        await metering
    finally:
        for cs in chans:
            for c in cs:
                await c.close(None)
    for rec, share in zip(recs, loads, strict=True):
        rec.material = sum(ld.material_sent for ld in share)
    merged = Recorder(start, end)
    for r in recs:
        merged.actions.update(r.actions)
        merged.warmup_actions.update(r.warmup_actions)
        merged.latencies.extend(r.latencies)
        merged.send_lag.extend(r.send_lag)
        merged.stream_errors.update(r.stream_errors)
        merged.error_details.update(r.error_details)
        merged.register_errors.update(r.register_errors)
        merged.max_interval_ms = max(merged.max_interval_ms, r.max_interval_ms)
        for name in (
            "sent_window", "sent_total", "skipped", "unanswered", "raised_interval_acks",
            "reregistered", "material", "open_failures",
        ):  # fmt: skip
            setattr(merged, name, getattr(merged, name) + getattr(r, name))
    return {
        "total": _summary(merged, duration_s),
        "per_server": [_summary(r, duration_s) for r in recs],
        "register_s": register_s,
        "open_s": open_s,
        "register_errors": dict(reg_errors),
        "client_cores": (cpu[1] - cpu[0]) / duration_s,
    }


# --------------------------------------------------------------------------- select callers


async def select_fleet(
    gate: Gate,
    *,
    addresses: list[str],
    callers: int,
    think_ms: float,
    count: int,
    warmup_s: float,
    duration_s: float,
) -> Result:
    """SelectNodes job (another worker process): ``callers`` closed loops with a think
    time, caller i calling ``addresses[i % len(addresses)]``."""
    req = pb.SelectNodesRequest(pool_id=POOL, count=count)
    chans = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        stubs: list[Stub] = [pb_grpc.RegistryServiceStub(c) for c in chans]
        for c in chans:
            await asyncio.wait_for(c.channel_ready(), 10)
        go_at = await gate.ready()
        start, end = go_at + warmup_s, go_at + warmup_s + duration_s
        samples: list[list[float]] = [[] for _ in addresses]
        errors: Counter[str] = Counter()
        short = [0]
        think = think_ms / 1000

        async def caller(i: int) -> None:
            stub = stubs[i % len(stubs)]
            await harness.sleep_until(go_at + i * think / callers)
            while (now := time.monotonic()) < end:
                try:
                    resp = await stub.SelectNodes(req, timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as exc:
                    if now >= start:
                        errors[str(exc.code())] += 1
                else:
                    done = time.monotonic()
                    if now >= start:
                        samples[i % len(stubs)].append(done - now)
                        if len(resp.nodes) < count:
                            short[0] += 1
                await asyncio.sleep(think)

        await asyncio.wait_for(
            asyncio.gather(*(caller(i) for i in range(callers))),
            warmup_s + duration_s + RPC_TIMEOUT_S + 30,
        )
    finally:
        for c in chans:
            await c.close(None)
    every = [s for per in samples for s in per]
    lat = harness.latency_summary(every)
    return {
        "calls": lat["n"],
        "calls_per_s": lat["n"] / duration_s,
        "latency": lat,
        "per_server": [harness.latency_summary(s) for s in samples],
        "errors": dict(errors),
        "short_answers": short[0],
    }


async def fleet_job(gate: Gate, *, role: str, **job: Any) -> Result:
    """The one target ``LoadWorkers.run`` sends to every worker; ``role`` picks the job."""
    if role == "beat":
        return await beat_fleet(gate, **job)
    if role == "select":
        return await select_fleet(gate, **job)
    raise ValueError(f"unknown fleet job {role!r}")


# --------------------------------------------------------------------------- orchestration


def _status(channel: grpc.Channel) -> Result | None:
    try:
        s = pb_grpc.RegistryServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    except grpc.RpcError:
        return None
    out: Result = {name: int(getattr(s, name, 0)) for name in STATUS_FIELDS}
    out["mode"] = s.mode
    return out


class Probe:
    """The parent's view of a run: CPU over the measured window, and each sidecar's
    GetStatus at its start and end and every second in between."""

    def __init__(
        self,
        pids: dict[str, int | None],
        addresses: Sequence[str],
        warmup_s: float,
        duration_s: float,
    ) -> None:
        self._meter = harness.CpuMeter(pids)
        self._channels = [grpc.insecure_channel(a) for a in addresses]
        self._warmup_s, self._duration_s = warmup_s, duration_s
        self.cores: dict[str, float] = {}
        self.before: list[Result | None] = [None] * len(addresses)
        self.window_start: list[Result | None] = [None] * len(addresses)
        self.window_end: list[Result | None] = [None] * len(addresses)
        self.samples: list[list[Result]] = [[] for _ in addresses]
        self.failed_probes = 0
        self.freeze: tuple[float, float, Callable[[], None], Callable[[], None]] | None = None
        """(at, for, pause, resume): freeze Redis this long into the window (fault run)."""
        self.detected_ms: list[float | None] = [None] * len(addresses)
        """Fault run: how long after the freeze each sidecar was degraded."""

    def snapshot(self) -> list[Result | None]:
        out = [_status(c) for c in self._channels]
        self.failed_probes += sum(1 for s in out if s is None)
        return out

    def during(self, go_at: float) -> None:
        time.sleep(max(go_at + self._warmup_s - time.monotonic(), 0))
        self.window_start = self.snapshot() if self._channels else []
        self._meter.start()
        end = time.monotonic() + self._duration_s
        if self.freeze is not None:
            self._freeze(*self.freeze)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(SAMPLE_S, left))
            if self._channels and time.monotonic() < end:
                for i, s in enumerate(self.snapshot()):
                    if s is not None:
                        self.samples[i].append(s)
        self.cores.update(self._meter.stop())
        self.window_end = self.snapshot() if self._channels else []

    def _freeze(
        self, at: float, hold: float, pause: Callable[[], None], resume: Callable[[], None]
    ) -> None:
        """SIGSTOP Redis ``at`` s into the window for ``hold`` s; poll GetStatus (its
        ``degraded_ms`` dates the trip to the millisecond) until each sidecar noticed."""
        time.sleep(at)
        stubs = [pb_grpc.RegistryServiceStub(c) for c in self._channels]
        frozen = time.monotonic()
        pause()
        try:
            while time.monotonic() - frozen < hold:
                for i, stub in enumerate(stubs):
                    if self.detected_ms[i] is not None:
                        continue
                    with contextlib.suppress(grpc.RpcError):
                        st = stub.GetStatus(pb.GetStatusRequest(), timeout=1)
                        if st.mode != "NORMAL" and st.outages:
                            tripped = time.monotonic() - st.degraded_ms / 1000
                            self.detected_ms[i] = round(1000 * (tripped - frozen), 1)
                time.sleep(0.005)
        finally:
            resume()

    def close(self) -> None:
        for c in self._channels:
            c.close()


def _delta(a: Result | None, b: Result | None, name: str) -> int | None:
    return None if a is None or b is None else int(b[name]) - int(a[name])


def _server_report(probe: Probe, i: int, after: Result | None) -> Result:
    """One sidecar's degraded-mode counters: over the whole run and the measured window."""
    before, ws, we = probe.before[i], probe.window_start[i], probe.window_end[i]
    samples = probe.samples[i]
    return {
        "before": before,
        "window_start": ws,
        "window_end": we,
        "after": after,
        "transitions_run": _delta(before, after, "mode_transitions"),
        "outages_run": _delta(before, after, "outages"),
        "transitions_window": _delta(ws, we, "mode_transitions"),
        "outages_window": _delta(ws, we, "outages"),
        "buffered_heartbeats_max": max(
            (int(s["buffered_heartbeats"]) for s in samples if s), default=0
        ),
        "modes_seen": sorted({str(s["mode"]) for s in [*samples, ws, we, after] if s}),
        "redis_p99_us_max": max((int(s["redis_latency_p99_us"]) for s in samples), default=0),
    }


def _jobs(plan: Plan, nodes: int, addresses: list[str], *, register: bool) -> list[Result]:
    ids = [f"fleet-{i:05d}" for i in range(nodes)]
    share = [ids[i :: len(addresses)] for i in range(len(addresses))]
    beat: Result = {
        "role": "beat",
        "addresses": addresses,
        "node_ids": share,
        "register": register,
        "honour_interval": register,
        "interval_ms": plan.interval_ms,
        "streams_per_channel": plan.streams_per_channel,
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
        "material": plan.material,
        "seed": plan.seed,
    }
    select: Result = {
        "role": "select",
        "addresses": addresses,
        "callers": plan.callers,
        "think_ms": plan.think_ms,
        "count": plan.select_count,
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
    }
    return [beat, select]


def _timeout(plan: Plan, nodes: int) -> float:
    # Registration (generously at 200 nodes/s) + warm-up + window + every grace period.
    return nodes / 200 + plan.warmup_s + plan.duration_s + ANSWER_GRACE_S + 120


def _capture(address: str, count: int) -> dict[bytes, bytes]:
    req = pb.SelectNodesRequest(pool_id=POOL, count=count)
    with grpc.insecure_channel(address) as channel:
        resp = pb_grpc.RegistryServiceStub(channel).SelectNodes(req, timeout=RPC_TIMEOUT_S)
    return {req.SerializeToString(deterministic=True): resp.SerializeToString()}


def _sidecar_run(workers: LoadWorkers, plan: Plan, nodes: int) -> tuple[Result, dict[bytes, bytes]]:
    from tests.support.redis_proc import RedisProcess

    with RedisProcess() as redis_proc, contextlib.ExitStack() as stack:
        params = {"redis_url": redis_proc.url, "namespace": NAMESPACE}
        servers = [
            stack.enter_context(ServerProcess(ServerSpec("sidecar", params, lifetime_s=1800)))
            for _ in range(plan.sidecars)
        ]
        addresses = [s.address for s in servers]
        pids: dict[str, int | None] = {f"sidecar{i}": s.pid for i, s in enumerate(servers)}
        pids |= {"redis": redis_proc.pid, "loadgen": workers.pids[0], "select": workers.pids[1]}
        probe = Probe(pids, addresses, plan.warmup_s, plan.duration_s)
        if plan.freeze_at_s is not None:
            probe.freeze = (plan.freeze_at_s, plan.freeze_s, redis_proc.pause, redis_proc.resume)
        try:
            probe.before = probe.snapshot()
            beat, select = workers.run(
                fleet_job,
                _jobs(plan, nodes, addresses, register=True),
                timeout_s=_timeout(plan, nodes),
                during=probe.during,
            )
            after = probe.snapshot()
        finally:
            probe.close()
        canned = _capture(addresses[0], plan.select_count)
        rss = {f"sidecar{i}": round(harness.rss_mb(s.pid), 1) for i, s in enumerate(servers)}
        rss["redis"] = round(harness.rss_mb(redis_proc.pid), 1) if redis_proc.pid else 0.0
    cores = {**probe.cores, "loadgen_self": round(beat.pop("client_cores"), 3)}
    cores["others"] = harness.others({k: v for k, v in cores.items() if k != "loadgen_self"})
    return {
        "heartbeat": beat,
        "select": select,
        "servers": [_server_report(probe, i, after[i]) for i in range(len(addresses))],
        "failed_status_probes": probe.failed_probes,
        "freeze_detected_ms": probe.detected_ms if plan.freeze_at_s is not None else None,
        "cores": cores,
        "rss_mb": rss,
    }, canned


def _echo_run(workers: LoadWorkers, plan: Plan, nodes: int, canned: dict[bytes, bytes]) -> Result:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(ServerProcess(ServerSpec("echo", {"canned": canned})))
            for _ in range(plan.sidecars)
        ]
        addresses = [s.address for s in servers]
        pids: dict[str, int | None] = {f"echo{i}": s.pid for i, s in enumerate(servers)}
        pids |= {"loadgen": workers.pids[0], "select": workers.pids[1]}
        probe = Probe(pids, [], plan.warmup_s, plan.duration_s)
        try:
            beat, select = workers.run(
                fleet_job,
                _jobs(plan, nodes, addresses, register=False),
                timeout_s=_timeout(plan, nodes),
                during=probe.during,
            )
        finally:
            probe.close()
        rss = {f"echo{i}": round(harness.rss_mb(s.pid), 1) for i, s in enumerate(servers)}
    cores = {**probe.cores, "loadgen_self": round(beat.pop("client_cores"), 3)}
    cores["others"] = harness.others({k: v for k, v in cores.items() if k != "loadgen_self"})
    return {"heartbeat": beat, "select": select, "cores": cores, "rss_mb": rss}


def _targets(sc: Result) -> dict[str, bool]:
    hb = sc["heartbeat"]["total"]
    transitions = [s["transitions_run"] for s in sc["servers"]]
    buffered = hb["actions"]["BUFFERED"] + hb["warmup_actions"]["BUFFERED"]
    return {
        "buffered_acks==0": buffered == 0,
        "degraded_transitions==0": all(t == 0 for t in transitions),
        "all_answered": hb["unanswered"] == 0 and not hb["stream_errors"] and hb["acks"] > 0,
        "ack_p99<20ms": 0 < hb["latency"]["p99_ms"] < 20.0,
        "select_p99<10ms": 0 < sc["select"]["latency"]["p99_ms"] < 10.0
        and not sc["select"]["errors"],
    }


def run_size(workers: LoadWorkers, plan: Plan, nodes: int) -> Result:
    """One fleet size: the sidecars (and their Redis), then the echo baseline."""
    started = time.monotonic()
    sidecar, canned = _sidecar_run(workers, plan, nodes)
    echo = _echo_run(workers, plan, nodes, canned)
    sh, eh = sidecar["heartbeat"]["total"], echo["heartbeat"]["total"]
    ss, es = sidecar["select"], echo["select"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    targets = _targets(sidecar)
    return {
        "nodes": nodes,
        "sidecar": sidecar,
        "echo": echo,
        "ratio": {
            "ack_p99": ratio(sh["latency"]["p99_ms"], eh["latency"]["p99_ms"]),
            "ack_rate": ratio(sh["rate"], eh["rate"]),
            "select_p99": ratio(ss["latency"]["p99_ms"], es["latency"]["p99_ms"]),
            "select_rate": ratio(ss["calls_per_s"], es["calls_per_s"]),
        },
        "targets": targets,
        "met": all(targets.values()),
        "generator_late": max(sh["send_lag"]["p99_ms"], eh["send_lag"]["p99_ms"])
        > SEND_LAG_WARN_MS,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def run(plan: Plan) -> Result:
    sizes = list(plan.sweep) or [plan.nodes]
    result: Result = {"plan": {**plan.__dict__, "sweep": sizes}, "runs": []}
    with LoadWorkers(2) as workers:
        for n in sizes:
            result["runs"].append(run_size(workers, plan, n))
            if len(sizes) > 1:
                print(report_size(result["runs"][-1], plan), flush=True)
    ok = [r["nodes"] for r in result["runs"] if r["met"]]
    result["largest_ok"] = max(ok) if ok else 0
    return result


# --------------------------------------------------------------------------- report


def _pct(cores: float) -> str:
    return f"{cores * 100:.0f}%"


def report_size(r: Result, plan: Plan) -> str:
    n = r["nodes"]
    sc, ec = r["sidecar"], r["echo"]
    out = (
        f"Fleet of {n:,} nodes over {plan.sidecars} sidecars on one Redis: one Heartbeat "
        f"stream each ({plan.streams_per_channel} per channel), a beat every "
        f"{plan.interval_ms} ms, {plan.material:.0%} material; {plan.callers} SelectNodes "
        f"callers (think {plan.think_ms:g} ms, count={plan.select_count}); warm-up "
        f"{plan.warmup_s:g} s, measured {plan.duration_s:g} s\n"
        f"streams opened (before registering) in {sc['heartbeat']['open_s']:.1f} s "
        f"({sc['heartbeat']['total']['open_failures']} failed to open, reopened at their "
        "first beat); "
        f"registration: {n:,} nodes in {sc['heartbeat']['register_s']:.1f} s "
        f"({n / max(sc['heartbeat']['register_s'], 1e-9):,.0f}/s)"
        f"{', errors ' + str(sc['heartbeat']['register_errors']) if sc['heartbeat']['register_errors'] else ''}\n\n"  # noqa: E501
    )
    rows: list[list[Any]] = []
    for name, side in (("sidecars", sc), ("echo", ec)):
        h = side["heartbeat"]["total"]
        a = h["actions"]
        rows.append([
            name, h["offered_rate"], h["rate"], a["CONTINUE"], a["BUFFERED"], a["REGISTER"],
            h["latency"]["p50_ms"], h["latency"]["p99_ms"], h["latency"]["max_ms"],
            h["send_lag"]["p99_ms"], h["skipped"], h["unanswered"],
            sum(h["stream_errors"].values()), h["max_interval_ms"],
        ])  # fmt: skip
    for i, h in enumerate(sc["heartbeat"]["per_server"]):
        a = h["actions"]
        rows.append([
            f"  sidecar{i}", h["offered_rate"], h["rate"], a["CONTINUE"], a["BUFFERED"],
            a["REGISTER"], h["latency"]["p50_ms"], h["latency"]["p99_ms"],
            h["latency"]["max_ms"], h["send_lag"]["p99_ms"], h["skipped"], h["unanswered"],
            sum(h["stream_errors"].values()), h["max_interval_ms"],
        ])  # fmt: skip
    out += harness.table(
        "Heartbeat acks in the measured window (latency: write -> response with its seq, ms)",
        ["run", "sent/s", "acks/s", "CONTINUE", "BUFFERED", "REGISTER", "p50", "p99", "max",
         "send lag p99", "skipped", "unanswered", "stream errs", "max interval_ms"],
        rows,
    )  # fmt: skip
    sh = sc["heartbeat"]["total"]
    ratio = r["ratio"]
    out += (
        f"ratio sidecars/echo: ack p99 {ratio['ack_p99']:.2f}x, ack rate {ratio['ack_rate']:.2f}x; "
        f"warm-up acks (not measured) {sh['warmup_actions']}; re-registrations "
        f"{sh['reregistered']}; beats acked with a raised interval_ms "
        f"{sh['raised_interval_acks']} (echo answers a fixed 3333, not followed)\n"
    )
    for name, side in (("sidecars", sc), ("echo", ec)):
        for detail, count in side["heartbeat"]["total"]["error_details"].items():
            out += f"stream error ({name}) x{count}: {detail}\n"
    out += "\n"
    rows = []
    for name, side in (("sidecars", sc), ("echo", ec)):
        s = side["select"]
        rows.append([
            name, s["calls_per_s"], s["latency"]["p50_ms"], s["latency"]["p99_ms"],
            s["latency"]["max_ms"], sum(s["errors"].values()), s["short_answers"],
        ])  # fmt: skip
    out += harness.table(
        f"SelectNodes (pool {POOL!r}, count={plan.select_count}) during the heartbeat load, ms",
        ["run", "calls/s", "p50", "p99", "max", "errors", "short answers"],
        rows,
    )
    out += (
        f"ratio sidecars/echo: SelectNodes p99 {ratio['select_p99']:.2f}x, "
        f"rate {ratio['select_rate']:.2f}x\n\n"
    )
    rows = []
    for i, s in enumerate(sc["servers"]):
        b, a = s["before"] or {}, s["after"] or {}
        rows.append([
            f"sidecar{i}", s["transitions_run"], s["outages_run"], s["transitions_window"],
            s["outages_window"], f"{b.get('buffered_heartbeats', '-')}/"
            f"{s['buffered_heartbeats_max']}/{a.get('buffered_heartbeats', '-')}",
            ",".join(s["modes_seen"]), s["redis_p99_us_max"] / 1e3,
            _pct(sc["cores"].get(f"sidecar{i}", 0)), sc["rss_mb"].get(f"sidecar{i}", 0),
        ])  # fmt: skip
    out += harness.table(
        "Sidecars (GetStatus; run = before registration to after the window)",
        ["sidecar", "transitions run", "outages run", "transitions window", "outages window",
         "buffered hb before/max/after", "modes seen", "redis p99 ms (max)", "CPU", "RSS MiB"],
        rows,
    )  # fmt: skip
    c, e = sc["cores"], ec["cores"]
    names = [f"sidecar{i}" for i in range(plan.sidecars)] + ["redis", "loadgen", "select"]
    out += (
        "CPU in the measured window (100% = one core): "
        + ", ".join(f"{k} {_pct(c.get(k, 0))}" for k in names)
        + f", machine {_pct(c.get('machine', 0))} (others {_pct(c.get('others', 0))}); echo run: "
        + ", ".join(
            f"{k} {_pct(e.get(k, 0))}"
            for k in [f"echo{i}" for i in range(plan.sidecars)] + ["loadgen", "select"]
        )
        + f", machine {_pct(e.get('machine', 0))} (others {_pct(e.get('others', 0))})\n"
    )
    t = r["targets"]
    if sc.get("freeze_detected_ms") is not None:
        out += (
            f"fault run: Redis frozen (SIGSTOP) {plan.freeze_at_s:g} s into the window for "
            f"{plan.freeze_s:g} s; degraded after (ms, per sidecar): {sc['freeze_detected_ms']}"
            " (the targets below do not apply to a fault run)\n"
        )
    out += "targets: " + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in t.items())
    out += f" -> {'PASS' if r['met'] else 'FAIL'}\n"
    if r["generator_late"]:
        out += (
            f"WARNING: the load generator fell behind its schedule (send lag p99 > "
            f"{SEND_LAG_WARN_MS:g} ms): it could not offer the full load\n"
        )
    return out + harness.noise_warning([sc, ec])


def _past(r: Result) -> str:
    sh = r["sidecar"]["heartbeat"]["total"]
    servers = r["sidecar"]["servers"]
    failed = [k for k, v in r["targets"].items() if not v]
    return (
        f"{r['nodes']:,} nodes: {', '.join(failed)} failed; max interval_ms "
        f"{sh['max_interval_ms']}, BUFFERED {sh['actions']['BUFFERED']} "
        f"(+{sh['warmup_actions']['BUFFERED']} in warm-up), REGISTER {sh['actions']['REGISTER']}, "
        f"transitions {[s['transitions_run'] for s in servers]}, outages "
        f"{[s['outages_run'] for s in servers]}, ack p99 {sh['latency']['p99_ms']:.1f} ms, "
        f"acks/s {sh['rate']:,.0f} of {sh['offered_rate']:,.0f} sent/s, unanswered "
        f"{sh['unanswered']}, SelectNodes p99 "
        f"{r['sidecar']['select']['latency']['p99_ms']:.1f} ms"
    )


def report(result: Result) -> str:
    plan = Plan(**{**result["plan"], "sweep": tuple(result["plan"]["sweep"])})
    runs = result["runs"]
    if len(runs) == 1:
        return report_size(runs[0], plan)
    rows = []
    for r in runs:
        sh = r["sidecar"]["heartbeat"]["total"]
        eh = r["echo"]["heartbeat"]["total"]
        rows.append([
            r["nodes"], sh["offered_rate"], sh["rate"], eh["rate"], sh["latency"]["p99_ms"],
            eh["latency"]["p99_ms"], sh["actions"]["BUFFERED"], sh["actions"]["REGISTER"],
            sum(s["transitions_run"] or 0 for s in r["sidecar"]["servers"]),
            sh["max_interval_ms"], r["sidecar"]["select"]["latency"]["p99_ms"],
            sh["send_lag"]["p99_ms"], "PASS" if r["met"] else "FAIL",
        ])  # fmt: skip
    out = harness.table(
        "Fleet sweep (sidecars vs echo; ms)",
        ["nodes", "sent/s", "acks/s", "echo acks/s", "ack p99", "echo p99", "BUFFERED",
         "REGISTER", "transitions", "max interval_ms", "select p99", "send lag p99", "result"],
        rows,
    )  # fmt: skip
    largest = result["largest_ok"]
    out += (
        f"largest fleet that met every target: {largest:,} nodes\n"
        if largest
        else "no fleet size met every target\n"
    )
    for r in runs:
        if r["nodes"] > largest and not r["met"]:
            out += ("  past it: " if largest else "  ") + _past(r) + "\n"
    return out
