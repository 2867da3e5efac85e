"""SelectNodes over a fleet of 10,000 nodes: in process, end to end, and memory.

The fleet (seeded, so every run selects over the same nodes): 20 pools (a node is in one
or two), 30 language pairs (one to three each), services from six names, labels region /
accel / tier, capacity 4-16, random metrics (so health scores vary), 2 % drained, 10 %
with a running job and 1 % full. It is written straight to a fresh redis-server through
``registry.gateway.Gateway`` (the bulk write is timed), then a sidecar starts on it, so
its start-up time includes the preload of every node.

- In process: ``registry.selection.select`` on a Replica holding the same nodes, in this
  (orchestrator) process while nothing else runs; also the handler's whole work
  (decode, select, build and serialize the response).
- End to end: SelectNodes over gRPC from a load-generator process, 1 and 4 callers,
  against the sidecar and against the echo server answering a canned copy of the real
  response (same size), so the ratio isolates what selection costs.
- Memory: VmRSS of the sidecar process with the fleet loaded, and of the echo server
  (interpreter + gRPC, no registry) for comparison.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc

from bench import harness
from bench.harness import Gate, LoadWorkers, Result, ServerProcess, ServerSpec
from registry import convert, validation
from registry.cache import Replica
from registry.gateway import Gateway
from registry.model import HeartbeatIn, InstalledService, LanguagePair, Metrics, NodeSpec
from registry.selection import select
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

NAMESPACE = "bench"
POOLS = [f"pool-{i:02d}" for i in range(20)]
LANGS = ["en", "de", "fr", "es", "it", "pt", "nl", "pl"]
PAIRS = [(s, t) for s in LANGS for t in LANGS if s != t][:30]
SERVICES = ["mt", "asr", "tts", "ocr", "qe", "lid"]
REGIONS = ["eu", "us", "ap"]
ACCELS = ["a100", "t4", "none"]
NODE_TTL_MS = 3_600_000
"""Nodes get no heartbeats here: a TTL longer than the run keeps them ONLINE."""

SELECTORS: dict[str, pb.SelectNodesRequest] = {
    "all nodes, no filter": pb.SelectNodesRequest(count=5),
    "pool + lang pair": pb.SelectNodesRequest(
        pool_id="pool-03", lang_pair=pb.LanguagePair(src="en", tgt="de"), count=5
    ),
    "pool + services + labels + min_health": pb.SelectNodesRequest(
        pool_id="pool-07",
        required_services=["mt", "qe"],
        labels={"region": "eu"},
        min_health=0.5,
        count=5,
    ),
}


@dataclass(frozen=True)
class Plan:
    nodes: int = 10_000
    calls: int = 3_000
    inproc_budget_s: float = 3.0
    warmup_s: float = 0.5
    duration_s: float = 4.0
    concurrency: tuple[int, ...] = (1, 4)
    repeat: int = 3
    """Each end-to-end run repeats this often, sidecar and echo alternating; medians count."""
    seed: int = 7


# --------------------------------------------------------------------------- the fleet


def fleet(n: int, seed: int) -> list[tuple[NodeSpec, Metrics]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        services = rng.sample(SERVICES, rng.randint(1, 3))
        spec = NodeSpec(
            node_id=f"node-{i:05d}",
            address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:7000",
            pools=tuple(rng.sample(POOLS, 1 if rng.random() < 0.8 else 2)),
            lang_pairs=tuple(LanguagePair(s, t) for s, t in rng.sample(PAIRS, rng.randint(1, 3))),
            services=tuple(InstalledService(s, "grpc", f"1.{rng.randint(0, 9)}") for s in services),
            labels={
                "region": rng.choice(REGIONS),
                "accel": rng.choice(ACCELS),
                "tier": "spot" if rng.random() < 0.3 else "standard",
            },
            capacity=rng.randint(4, 16),
        )
        metrics = Metrics(
            cpu=rng.random(),
            gpu=rng.random(),
            mem=rng.random(),
            load=rng.random(),
            error_rate=rng.random() * 0.2,
        )
        out.append((spec, metrics))
    return out


async def load_fleet(
    url: str, plan: Plan, *, capacity: int | None = None, reserve_jobs: bool = True
) -> Result:
    """Write the fleet through the gateway: register, heartbeat, drain, reserve.

    ``capacity`` overrides every node's capacity; ``reserve_jobs=False`` leaves every node
    without reservations (no full or busy nodes; 2 % are still drained).
    """
    nodes = fleet(plan.nodes, plan.seed)
    if capacity is not None:
        nodes = [(dataclasses.replace(spec, capacity=capacity), m) for spec, m in nodes]
    rng = random.Random(plan.seed + 1)
    limit = asyncio.Semaphore(64)
    async with Gateway(url, NAMESPACE) as gw:
        await gw.ensure_epoch()

        async def register(spec: NodeSpec) -> None:
            async with limit:
                await gw.register(spec, NODE_TTL_MS)

        t0 = time.perf_counter()
        await asyncio.gather(*(register(spec) for spec, _ in nodes))
        register_s = time.perf_counter() - t0
        beats = [HeartbeatIn(s.node_id, m) for s, m in nodes]
        t1 = time.perf_counter()
        await asyncio.gather(*(gw.heartbeat(hb) for hb in beats))
        heartbeat_s = time.perf_counter() - t1

        async def reserve(spec: NodeSpec, jobs: int) -> None:
            async with limit:
                for j in range(jobs):
                    await gw.reserve(spec.node_id, f"job-{spec.node_id}-{j}", NODE_TTL_MS)

        specs = [s for s, _ in nodes]
        rng.shuffle(specs)
        drained = specs[: plan.nodes // 50]
        full = specs[len(drained) : len(drained) + plan.nodes // 100]
        busy = specs[len(drained) + len(full) : len(drained) + len(full) + plan.nodes // 10]
        await asyncio.gather(*(gw.drain(s.node_id) for s in drained))
        if not reserve_jobs:
            full, busy = [], []
        await asyncio.gather(
            *(reserve(s, s.capacity) for s in full), *(reserve(s, 1) for s in busy)
        )
        t2 = time.perf_counter()
        snap = await gw.snapshot()
        snapshot_s = time.perf_counter() - t2
    replica = Replica()
    t3 = time.perf_counter()
    replica.replace_all(snap.nodes, snap.version)
    replica_s = time.perf_counter() - t3
    replica.ready = True
    return {
        "replica": replica,
        "register_s": register_s,
        "register_per_s": plan.nodes / register_s,
        "heartbeat_s": heartbeat_s,
        "snapshot_s": snapshot_s,
        "replica_build_s": replica_s,
        "drained": len(drained),
        "full": len(full),
        "busy": len(busy),
    }


# --------------------------------------------------------------------------- in process


def _handler_work(replica: Replica, raw: bytes) -> bytes:
    """What the SelectNodes handler does besides gRPC: decode, select, encode."""
    req = pb.SelectNodesRequest.FromString(raw)
    sel = validation.check_selector(convert.selector_from_pb(req))
    result = select(replica, sel)
    resp = pb.SelectNodesResponse(
        nodes=[convert.node_to_pb(n) for n in result.nodes],
        breakdown=convert.breakdown_to_pb(result.breakdown),
        freshness=pb.Freshness(version=replica.version),
    )
    return resp.SerializeToString()


def in_process(replica: Replica, plan: Plan) -> Result:
    out: Result = {}
    for name, req in SELECTORS.items():
        sel = convert.selector_from_pb(req)
        raw = req.SerializeToString()
        row: Result = {}
        for kind, fn in (
            ("select", functools.partial(select, replica, sel)),
            ("handler", functools.partial(_handler_work, replica, raw)),
        ):
            for _ in range(20):
                fn()
            gc.collect()
            meter = harness.CpuMeter({"bench": os.getpid()})
            meter.start()
            samples: list[float] = []
            stop = time.perf_counter() + plan.inproc_budget_s
            while len(samples) < plan.calls and (len(samples) < 50 or time.perf_counter() < stop):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            row[kind] = {**harness.latency_summary(samples), "others": harness.others(meter.stop())}
        row["eligible"] = select(replica, sel).breakdown.eligible
        row["candidates"] = len(list(replica.candidates(sel.pool_id, sel.lang_pair)))
        out[name] = row
    return out


# --------------------------------------------------------------------------- end to end


async def call_select(
    gate: Gate,
    *,
    address: str,
    request: bytes,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> Result:
    """Load-generator job: ``concurrency`` callers in a loop, one channel."""
    req = pb.SelectNodesRequest.FromString(request)
    async with grpc.aio.insecure_channel(address) as channel:
        stub: pb_grpc.RegistryServiceAsyncStub = pb_grpc.RegistryServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        await stub.SelectNodes(req, timeout=10)
        go_at = await gate.ready()
        start, end = go_at + warmup_s, go_at + warmup_s + duration_s
        samples: list[float] = []
        cpu: list[float] = []

        async def caller() -> None:
            await harness.sleep_until(go_at)
            while (now := time.monotonic()) < end:
                await stub.SelectNodes(req, timeout=10)
                done = time.monotonic()
                if done >= start and now < end:
                    samples.append(done - now)

        async def meter() -> None:
            await harness.sleep_until(start)
            cpu.append(time.process_time())
            await harness.sleep_until(end)
            cpu.append(time.process_time())

        await asyncio.wait_for(
            asyncio.gather(meter(), *(caller() for _ in range(concurrency))),
            warmup_s + duration_s + 30,
        )
    return {"latencies": samples, "client_cores": (cpu[1] - cpu[0]) / duration_s}


def _e2e(
    workers: LoadWorkers,
    server: ServerProcess,
    others: dict[str, int | None],
    plan: Plan,
    name: str,
    conc: int,
) -> Result:
    metered = harness.Window({"server": server.pid, **others}, plan.warmup_s, plan.duration_s)
    cores = metered.cores

    job = {
        "address": server.address,
        "request": SELECTORS[name].SerializeToString(),
        "concurrency": conc,
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
    }
    (res,) = workers.run(
        call_select, [job], timeout_s=plan.warmup_s + plan.duration_s + 60, during=metered.during
    )
    lat = harness.latency_summary(res["latencies"])
    cores["client"] = round(res["client_cores"], 3)
    cores["others"] = harness.others(cores)
    return {
        "selector": name,
        "callers": conc,
        "calls_per_s": lat["n"] / plan.duration_s,
        "latency": lat,
        "cores": cores,
    }


def _capture(address: str) -> dict[bytes, bytes]:
    """One real SelectNodes response per selector, for the echo server to replay."""
    canned: dict[bytes, bytes] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        for req in SELECTORS.values():
            resp = stub.SelectNodes(req, timeout=10)
            canned[req.SerializeToString(deterministic=True)] = resp.SerializeToString()
    return canned


def run(plan: Plan, *, profile_dir: str | None = None) -> Result:
    from tests.support.redis_proc import RedisProcess

    result: Result = {"plan": {**plan.__dict__, "selectors": list(SELECTORS)}}
    with RedisProcess() as redis_proc, LoadWorkers(1) as workers:
        loaded = asyncio.run(load_fleet(redis_proc.url, plan))
        replica: Replica = loaded.pop("replica")
        result["preload"] = loaded
        result["in_process"] = in_process(replica, plan)
        del replica
        gc.collect()
        params = {"redis_url": redis_proc.url, "namespace": NAMESPACE}
        with ServerProcess(ServerSpec("sidecar", params)) as sidecar:
            result["preload"]["sidecar_start_s"] = sidecar.start_s
            time.sleep(0.5)
            rss_loaded = harness.rss_mb(sidecar.pid)
            canned = _capture(sidecar.address)
            result["response_bytes"] = {
                name: len(canned[req.SerializeToString(deterministic=True)])
                for name, req in SELECTORS.items()
            }
            with ServerProcess(ServerSpec("echo", {"canned": canned})) as echo:
                runs: dict[str, dict[str, list[Result]]] = {"sidecar": {}, "echo": {}}
                others = {"redis": redis_proc.pid}
                for rep in range(plan.repeat):
                    if rep == 0 and profile_dir:
                        sidecar.command("profile-on")
                    for name in SELECTORS:
                        for conc in plan.concurrency:
                            key = f"{name} x{conc}"
                            runs["sidecar"].setdefault(key, []).append(
                                _e2e(workers, sidecar, others, plan, name, conc)
                            )
                            runs["echo"].setdefault(key, []).append(
                                _e2e(workers, echo, {}, plan, name, conc)
                            )
                    if rep == 0 and profile_dir:
                        path = f"{profile_dir}/sidecar-select.prof"
                        sidecar.command("profile-off", path)
                        result["profile"] = path
                rss_echo = harness.rss_mb(echo.pid)
            rss_after = harness.rss_mb(sidecar.pid)
        for side, by_key in runs.items():
            result[side] = {
                key: harness.median_run(phases, "calls_per_s") for key, phases in by_key.items()
            }
    result["rss_mb"] = {
        "sidecar_loaded": rss_loaded,
        "sidecar_after_load": rss_after,
        "echo": rss_echo,
    }
    result["ratio"] = {
        key: (sc["calls_per_s"] / result["echo"][key]["calls_per_s"])
        if result["echo"][key]["calls_per_s"]
        else 0.0
        for key, sc in result["sidecar"].items()
    }
    worst_inproc = max(r["select"]["p99_ms"] for r in result["in_process"].values())
    worst_e2e = max(r["latency"]["p99_ms"] for r in result["sidecar"].values())
    result["targets"] = {
        "in_process_p99<1ms": worst_inproc < 1.0,
        "end_to_end_p99<5ms": worst_e2e < 5.0,
        "rss<100MB": max(rss_loaded, rss_after) < 100.0,
    }
    return result


def report(r: Result) -> str:
    p = r["preload"]
    n = r["plan"]["nodes"]
    out = (
        f"Fleet: {n} nodes; bulk write through Gateway {p['register_s']:.2f} s "
        f"({p['register_per_s']:,.0f} registrations/s), snapshot read {p['snapshot_s']:.2f} s, "
        f"replica build {p['replica_build_s'] * 1e3:.0f} ms; sidecar start incl. preload "
        f"{p.get('sidecar_start_s', 0):.2f} s\n\n"
    )
    rows: list[list[Any]] = []
    for name, row in r["in_process"].items():
        rows.append([
            name, row["candidates"], row["eligible"], row["select"]["p50_ms"],
            row["select"]["p99_ms"], row["handler"]["p50_ms"], row["handler"]["p99_ms"],
        ])  # fmt: skip
    out += harness.table(
        f"SelectNodes in process over {n} nodes (ms; handler = decode + select + encode)",
        ["selector", "scanned", "eligible", "select p50", "select p99", "handler p50",
         "handler p99"],
        rows,
    )  # fmt: skip
    rows = []
    for key, sc in r["sidecar"].items():
        ec = r["echo"][key]
        rows.append([
            sc["selector"], sc["callers"], sc["calls_per_s"], sc["latency"]["p50_ms"],
            sc["latency"]["p99_ms"], ec["calls_per_s"], ec["latency"]["p50_ms"],
            ec["latency"]["p99_ms"], r["ratio"][key], sc["cores"].get("server", 0),
            max(sc["cores"].get("others", 0), ec["cores"].get("others", 0)),
            " ".join(f"{v:.0f}" for v in sc["repetitions"]),
        ])  # fmt: skip
    out += "\n" + harness.table(
        "SelectNodes end to end over gRPC (sidecar vs echo with a same-size canned response)",
        ["selector", "callers", "sc calls/s", "sc p50", "sc p99", "echo calls/s", "echo p50",
         "echo p99", "ratio", "sc cores", "others", "sc calls/s of each"],
        rows,
    )  # fmt: skip
    t = r["targets"]
    rss = r["rss_mb"]
    out += (
        f"RSS MiB: sidecar with {n} nodes {rss['sidecar_loaded']:.0f} "
        f"(after load {rss['sidecar_after_load']:.0f}), echo server {rss['echo']:.0f}\n"
        f"targets: in-process p99 < 1 ms {'met' if t['in_process_p99<1ms'] else 'NOT met'}; "
        f"end-to-end p99 < 5 ms {'met' if t['end_to_end_p99<5ms'] else 'NOT met'}; "
        f"RSS < 100 MB {'met' if t['rss<100MB'] else 'NOT met'}\n"
    )
    inproc = [
        {"cores": {"others": row[kind]["others"]}}
        for row in r["in_process"].values()
        for kind in ("select", "handler")
    ]
    return out + harness.noise_warning([*inproc, *r["sidecar"].values(), *r["echo"].values()])
