"""Schedule over a fleet of 10,000 nodes: end to end, against the echo baseline, in one run.

The fleet is select.py's (same seed, same pools, pairs, services, labels and metrics, 2 %
drained) with two differences: every node gets a capacity of ``Plan.capacity`` (100,000
slots) and no reservations are made beforehand. Reservations are never released, so
with that capacity no node fills up during the run (a run makes well under 100,000
reservations on the ~33 candidates of the selector), and every Schedule does the same
work: select, then reserve on the first candidate (one Lua script at Redis). Leases are
an hour long so no reservation expires while the bench runs.

Load: ``concurrency`` callers in one load-generator process, one channel, each calling
Schedule in a loop with a unique job id (``<run tag>-<caller>-<n>``), 1 and 4 callers.
The baseline is the echo server answering every Schedule with a canned copy of a real
ScheduleResponse (same size), so the ratio isolates what scheduling costs. The attempts
field of every sidecar response in the measured window is counted.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc

from bench import harness
from bench import select as sel
from bench.harness import Gate, LoadWorkers, Result, ServerProcess, ServerSpec
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

SELECTOR = "pool + lang pair"
"""The select bench's selector a scheduler typically sends (~33 candidates of 10,000)."""


@dataclass(frozen=True)
class Plan:
    nodes: int = 10_000
    capacity: int = 100_000
    lease_ms: int = 3_600_000
    warmup_s: float = 0.5
    duration_s: float = 4.0
    concurrency: tuple[int, ...] = (1, 4)
    repeat: int = 3
    """Each run repeats this often, sidecar and echo alternating; medians count."""
    seed: int = 7


# --------------------------------------------------------------------------- load side


async def call_schedule(
    gate: Gate,
    *,
    address: str,
    selector: bytes,
    tag: str,
    lease_ms: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> Result:
    """Load-generator job: ``concurrency`` callers in a loop, one channel, unique job ids."""
    sel_pb = pb.SelectNodesRequest.FromString(selector)
    async with grpc.aio.insecure_channel(address) as channel:
        stub: pb_grpc.RegistryServiceAsyncStub = pb_grpc.RegistryServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 10)
        await stub.Schedule(
            pb.ScheduleRequest(selector=sel_pb, job_id=f"{tag}-warm", lease_ms=lease_ms),
            timeout=10,
        )
        go_at = await gate.ready()
        start, end = go_at + warmup_s, go_at + warmup_s + duration_s
        samples: list[float] = []
        attempts: Counter[int] = Counter()
        renewed = 0
        cpu: list[float] = []

        async def caller(c: int) -> None:
            nonlocal renewed
            await harness.sleep_until(go_at)
            n = 0
            while (now := time.monotonic()) < end:
                n += 1
                job_id = f"{tag}-{c}-{n}"
                req = pb.ScheduleRequest(selector=sel_pb, job_id=job_id, lease_ms=lease_ms)
                resp = await stub.Schedule(req, timeout=10)
                done = time.monotonic()
                if done >= start and now < end:
                    samples.append(done - now)
                    attempts[resp.attempts] += 1
                    renewed += not resp.created

        async def meter() -> None:
            await harness.sleep_until(start)
            cpu.append(time.process_time())
            await harness.sleep_until(end)
            cpu.append(time.process_time())

        await asyncio.wait_for(
            asyncio.gather(meter(), *(caller(c) for c in range(concurrency))),
            warmup_s + duration_s + 30,
        )
    return {
        "latencies": samples,
        "attempts": dict(attempts),
        "renewed": renewed,
        "client_cores": (cpu[1] - cpu[0]) / duration_s,
    }


# --------------------------------------------------------------------------- orchestration


def _phase(
    workers: LoadWorkers,
    server: ServerProcess,
    others: dict[str, int | None],
    plan: Plan,
    conc: int,
    tag: str,
) -> Result:
    metered = harness.Window({"server": server.pid, **others}, plan.warmup_s, plan.duration_s)
    cores = metered.cores

    job = {
        "address": server.address,
        "selector": sel.SELECTORS[SELECTOR].SerializeToString(),
        "tag": tag,
        "lease_ms": plan.lease_ms,
        "concurrency": conc,
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
    }
    (res,) = workers.run(
        call_schedule, [job], timeout_s=plan.warmup_s + plan.duration_s + 60, during=metered.during
    )
    lat = harness.latency_summary(res["latencies"])
    cores["client"] = round(res["client_cores"], 3)
    cores["others"] = harness.others(cores)
    return {
        "callers": conc,
        "calls_per_s": lat["n"] / plan.duration_s,
        "latency": lat,
        "attempts": {int(k): v for k, v in res["attempts"].items()},
        "renewed": res["renewed"],
        "cores": cores,
    }


def _capture(address: str, lease_ms: int) -> bytes:
    """One real ScheduleResponse, for the echo server to replay."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        req = pb.ScheduleRequest(
            selector=sel.SELECTORS[SELECTOR], job_id="bench-capture", lease_ms=lease_ms
        )
        return bytes(stub.Schedule(req, timeout=10).SerializeToString())


def run(plan: Plan, *, profile_dir: str | None = None) -> Result:
    from tests.support.redis_proc import RedisProcess

    result: Result = {"plan": {**plan.__dict__, "selector": SELECTOR}}
    fleet_plan = sel.Plan(nodes=plan.nodes, seed=plan.seed)
    with RedisProcess() as redis_proc, LoadWorkers(1) as workers:
        loaded = asyncio.run(
            sel.load_fleet(redis_proc.url, fleet_plan, capacity=plan.capacity, reserve_jobs=False)
        )
        loaded.pop("replica")
        gc.collect()
        result["preload"] = {"register_s": loaded["register_s"], "drained": loaded["drained"]}
        params = {"redis_url": redis_proc.url, "namespace": sel.NAMESPACE}
        with ServerProcess(ServerSpec("sidecar", params)) as sidecar:
            result["preload"]["sidecar_start_s"] = sidecar.start_s
            canned = _capture(sidecar.address, plan.lease_ms)
            result["response_bytes"] = len(canned)
            with ServerProcess(ServerSpec("echo", {"schedule": canned})) as echo:
                runs: dict[str, dict[str, list[Result]]] = {"sidecar": {}, "echo": {}}
                others = {"redis": redis_proc.pid}
                for rep in range(plan.repeat):
                    if rep == 0 and profile_dir:
                        sidecar.command("profile-on")
                    for conc in plan.concurrency:
                        key = f"x{conc}"
                        tag = f"r{rep}c{conc}"
                        runs["sidecar"].setdefault(key, []).append(
                            _phase(workers, sidecar, others, plan, conc, tag)
                        )
                        runs["echo"].setdefault(key, []).append(
                            _phase(workers, echo, {}, plan, conc, tag)
                        )
                    if rep == 0 and profile_dir:
                        path = f"{profile_dir}/sidecar-schedule.prof"
                        sidecar.command("profile-off", path)
                        result["profile"] = path
            result["rss_mb"] = harness.rss_mb(sidecar.pid)
    for side, by_key in runs.items():
        result[side] = {
            key: harness.median_run(phases, "calls_per_s") for key, phases in by_key.items()
        }
    result["ratio"] = {
        key: (sc["calls_per_s"] / result["echo"][key]["calls_per_s"])
        if result["echo"][key]["calls_per_s"]
        else 0.0
        for key, sc in result["sidecar"].items()
    }
    total: Counter[int] = Counter()
    for phases in runs["sidecar"].values():
        for ph in phases:
            total.update(ph["attempts"])
    result["attempts"] = dict(sorted(total.items()))
    return result


def report(r: Result) -> str:
    p = r["preload"]
    plan = r["plan"]
    out = (
        f"Fleet: {plan['nodes']} nodes of capacity {plan['capacity']:,} (no reservations "
        f"beforehand, {p['drained']} drained); selector {plan['selector']!r}; "
        f"ScheduleResponse {r['response_bytes']} bytes; sidecar start incl. preload "
        f"{p['sidecar_start_s']:.2f} s\n"
    )
    rows: list[list[Any]] = []
    for key, sc in r["sidecar"].items():
        ec = r["echo"][key]
        rows.append([
            sc["callers"], sc["calls_per_s"], sc["latency"]["p50_ms"], sc["latency"]["p99_ms"],
            ec["calls_per_s"], ec["latency"]["p50_ms"], ec["latency"]["p99_ms"], r["ratio"][key],
            sc["cores"].get("server", 0), sc["cores"].get("redis", 0), sc["cores"].get("client", 0),
            max(sc["cores"].get("others", 0), ec["cores"].get("others", 0)),
            " ".join(f"{v:.0f}" for v in sc["repetitions"]),
        ])  # fmt: skip
    out += harness.table(
        "Schedule end to end over gRPC (sidecar vs echo with a same-size canned response)",
        ["callers", "sc calls/s", "sc p50", "sc p99", "echo calls/s", "echo p50", "echo p99",
         "ratio", "sc cores", "redis", "client", "others", "sc calls/s of each"],
        rows,
    )  # fmt: skip
    n = sum(r["attempts"].values())
    dist = ", ".join(f"{k}: {v} ({v / n:.1%})" for k, v in r["attempts"].items()) if n else "-"
    renewed = sum(ph["renewed"] for ph in r["sidecar"].values())
    out += (
        f"attempts per Schedule (every measured sidecar call, all repetitions): {dist}; "
        f"created=false in reported runs: {renewed}\n"
    )
    return out + harness.noise_warning([*r["sidecar"].values(), *r["echo"].values()])
