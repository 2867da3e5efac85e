"""A write at one sidecar seen at another: sidecar A -> Redis -> sidecar B's Watch stream.

Two sidecars, A and B, in child processes of their own, share one redis-server (started
for the run). The load-generator process registers one node through A, opens a Watch on
B and reads it past SNAPSHOT_END, then writes ``changes`` changes through A one at a
time: RegisterNode of that node with a new capacity each time. Sequential, not
pipelined: the next write is sent only once the previous one's PUT event has arrived on
B's stream (and A has answered). Each sample is the time from just before the write is
sent to the arrival of its event on B's stream, both on the load process's clock. A
change whose event has not arrived after ``change_timeout_s`` counts as lost.

Baseline in the same run: raw Redis on the same server, from the same load process, in
the same shape: XADD on one connection, a blocking XREAD (``BLOCK 1000`` from the last
id) on another connection (redis-py asyncio), one entry at a time, the next XADD once
the previous entry was read. That is the floor under any Redis-stream change feed.
Sidecar and Redis phases alternate ``repeat`` times; the median repetition (by p99) is
reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from bench import harness
from bench.harness import Gate, LoadTarget, LoadWorkers, Result, ServerProcess, ServerSpec
from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc

NAMESPACE = "bench"
NODE_ID = "prop-0"
NODE_TTL_MS = 3_600_000
PAYLOAD = b"x" * 200
"""Raw Redis entries carry this, about the size of a node's change-log entry."""


GIVE_UP_AFTER = 5
BUDGET_S = 120.0


@dataclass(frozen=True)
class Plan:
    changes: int = 1_000
    repeat: int = 3
    change_timeout_s: float = 2.0
    target_p99_ms: float = 10.0


# --------------------------------------------------------------------------- load side


class Arrivals:
    """Futures for awaited changes, keyed by the change's number, resolved at arrival."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[float]] = {}

    def expect(self, key: int) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        return fut

    def arrived(self, key: int, at: float) -> None:
        fut = self._waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(at)


async def sequential(
    changes: int,
    timeout_s: float,
    arrivals: Arrivals,
    write: Callable[[int], Any],
) -> Result:
    """Write change ``i`` (awaiting ``write(i)``), wait for its arrival, then the next.

    Gives up after ``GIVE_UP_AFTER`` lost changes in a row (the reader's stream is then
    taken as dead) or after ``BUDGET_S``; the changes never written are ``not_sent``."""
    latencies: list[float] = []
    acks: list[float] = []
    lost = in_a_row = write_errors = 0
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    sent = 0
    for i in range(changes):
        if in_a_row >= GIVE_UP_AFTER or time.perf_counter() - t_start > BUDGET_S:
            break
        sent += 1
        fut = arrivals.expect(i)
        t0 = time.perf_counter()
        try:
            await write(i)
        except grpc.RpcError:
            write_errors += 1
            in_a_row += 1
            continue
        acks.append(time.perf_counter() - t0)
        try:
            arrived = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            lost += 1
            in_a_row += 1
            continue
        in_a_row = 0
        latencies.append(arrived - t0)
    wall = time.perf_counter() - t_start
    return {
        "latencies": latencies,
        "acks": acks,
        "lost": lost,
        "write_errors": write_errors,
        "not_sent": changes - sent,
        "wall_s": wall,
        "client_cores": (time.process_time() - cpu0) / wall,
    }


async def sidecar_changes(
    gate: Gate,
    *,
    writer: str,
    watcher: str,
    first_capacity: int,
    changes: int,
    timeout_s: float,
) -> Result:
    """Load-generator job: RegisterNode through ``writer``, PUT events from ``watcher``."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(writer, options=options) as wch,
        grpc.aio.insecure_channel(watcher, options=options) as rch,
    ):
        a: pb_grpc.RegistryServiceAsyncStub = pb_grpc.RegistryServiceStub(wch)
        b: pb_grpc.RegistryServiceAsyncStub = pb_grpc.RegistryServiceStub(rch)

        def request(capacity: int) -> pb.RegisterNodeRequest:
            node = pb.Node(
                node_id=NODE_ID,
                address=f"{NODE_ID}.bench:7000",
                pools=["bench"],
                lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
                capacity=capacity,
            )
            return pb.RegisterNodeRequest(node=node, ttl_ms=NODE_TTL_MS)

        await a.RegisterNode(request(first_capacity - 1), timeout=10)
        arrivals = Arrivals()
        synced = asyncio.Event()
        call = b.Watch(pb.WatchRequest())

        async def read() -> None:
            async for ev in call:
                if ev.type == pb.WATCH_EVENT_TYPE_SNAPSHOT_END:
                    synced.set()
                elif ev.type == pb.WATCH_EVENT_TYPE_PUT and ev.node.node_id == NODE_ID:
                    arrivals.arrived(ev.node.capacity - first_capacity, time.perf_counter())

        reading = asyncio.create_task(read())
        try:
            await asyncio.wait_for(synced.wait(), 10)
            await asyncio.sleep(0.2)  # the first registration's event, if still on its way
            go_at = await gate.ready()
            await harness.sleep_until(go_at)

            async def write(i: int) -> None:
                await a.RegisterNode(request(first_capacity + i), timeout=10)

            return await asyncio.wait_for(
                sequential(changes, timeout_s, arrivals, write), BUDGET_S + 60
            )
        finally:
            reading.cancel()
            call.cancel()


async def redis_changes(
    gate: Gate, *, url: str, key: str, changes: int, timeout_s: float
) -> Result:
    """Load-generator job: XADD on one connection, blocking XREAD on another."""
    import redis.asyncio as aioredis

    w = aioredis.Redis.from_url(url, single_connection_client=True)
    r = aioredis.Redis.from_url(url, single_connection_client=True)
    try:
        last = await w.xadd(key, {"i": -1, "v": PAYLOAD}, maxlen=10_000)
        arrivals = Arrivals()

        async def read() -> None:
            nonlocal last
            while True:
                resp = await r.xread({key: last}, block=1000)
                now = time.perf_counter()
                for _stream, entries in resp or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        arrivals.arrived(int(fields[b"i"]), now)

        reading = asyncio.create_task(read())
        try:
            go_at = await gate.ready()
            await harness.sleep_until(go_at)

            async def write(i: int) -> None:
                await w.xadd(key, {"i": i, "v": PAYLOAD}, maxlen=10_000)

            return await asyncio.wait_for(
                sequential(changes, timeout_s, arrivals, write), BUDGET_S + 60
            )
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    finally:
        await w.aclose()
        await r.aclose()


# --------------------------------------------------------------------------- orchestration


def measure(
    workers: LoadWorkers, target: LoadTarget, job: dict[str, Any], pids: dict[str, int | None]
) -> Result:
    """One sequential phase; cores are metered over the whole phase."""
    meter = harness.CpuMeter(pids)
    (res,) = workers.run(
        target,
        [job],
        timeout_s=BUDGET_S + GIVE_UP_AFTER * (job["timeout_s"] + 10) + 90,
        during=lambda go_at: (time.sleep(max(go_at - time.monotonic(), 0)), meter.start()),
    )
    cores = meter.stop()
    cores["client"] = round(res["client_cores"], 3)
    cores["others"] = harness.others(cores)
    return {
        "changes": job["changes"],
        "latency": harness.latency_summary(res["latencies"]),
        "write_ack": harness.latency_summary(res["acks"]),
        "lost": res["lost"],
        "write_errors": res["write_errors"],
        "not_sent": res["not_sent"],
        "wall_s": res["wall_s"],
        "cores": cores,
    }


def sidecar_job(writer: ServerProcess, watcher: ServerProcess, plan: Plan, rep: int) -> Result:
    return {
        "writer": writer.address,
        "watcher": watcher.address,
        "first_capacity": 10 + rep * (plan.changes + 10),
        "changes": plan.changes,
        "timeout_s": plan.change_timeout_s,
    }


def run(plan: Plan) -> Result:
    from tests.support.redis_proc import RedisProcess

    result: Result = {"plan": plan.__dict__}
    runs: dict[str, list[Result]] = {"sidecar": [], "redis": []}
    with RedisProcess() as redis_proc, LoadWorkers(1) as workers:
        params = {"redis_url": redis_proc.url, "namespace": NAMESPACE}
        with (
            ServerProcess(ServerSpec("sidecar", params)) as a,
            ServerProcess(ServerSpec("sidecar", params)) as b,
        ):
            pids = {"a": a.pid, "b": b.pid, "redis": redis_proc.pid}
            for rep in range(plan.repeat):
                runs["sidecar"].append(
                    measure(workers, sidecar_changes, sidecar_job(a, b, plan, rep), pids)
                )
                job = {
                    "url": redis_proc.url,
                    "key": f"bench-raw-propagation-{rep}",
                    "changes": plan.changes,
                    "timeout_s": plan.change_timeout_s,
                }
                runs["redis"].append(measure(workers, redis_changes, job, pids))
    for name, phases in runs.items():
        result[name] = harness.median_run(phases, "latency", "p99_ms")
    sc, rd = result["sidecar"]["latency"], result["redis"]["latency"]
    result["ratio_p99"] = sc["p99_ms"] / rd["p99_ms"] if rd["p99_ms"] else 0.0
    result["ratio_p50"] = sc["p50_ms"] / rd["p50_ms"] if rd["p50_ms"] else 0.0
    result["targets"] = {"p99<10ms": 0 < sc["p99_ms"] < plan.target_p99_ms}
    return result


def rows(named: list[tuple[str, Result]]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for name, ph in named:
        lat, ack, c = ph["latency"], ph["write_ack"], ph["cores"]
        ours = sum(v for k, v in c.items() if k not in ("machine", "others", "client"))
        out.append([
            name, lat["n"], ph["lost"] + ph.get("write_errors", 0) + ph.get("not_sent", 0),
            lat["p50_ms"], lat["p90_ms"], lat["p99_ms"], lat["max_ms"],
            ack["p50_ms"], ack["p99_ms"], round(ours, 3), c.get("client", 0), c.get("others", 0),
            " ".join(f"{v:.2f}" for v in ph["repetitions"]),
        ])  # fmt: skip
    return out


HEADER = ["run", "seen", "missed", "p50 ms", "p90 ms", "p99 ms", "max ms", "write p50",
          "write p99", "srv cores", "client", "others", "p99 of each"]  # fmt: skip


def report(r: Result) -> str:
    out = harness.table(
        "Write -> event at another reader, sequential (ms from the write's send to the event)",
        HEADER,
        rows(
            [
                ("sidecar A -> Redis -> sidecar B Watch", r["sidecar"]),
                ("raw Redis XADD -> XREAD BLOCK", r["redis"]),
            ]
        ),
    )
    ok = r["targets"]["p99<10ms"]
    out += (
        f"ratio sidecar/raw Redis: p50 {r['ratio_p50']:.2f}, p99 {r['ratio_p99']:.2f}; "
        f"target p99 < 10 ms: {'met' if ok else 'NOT met'}\n"
        "srv cores = sidecar A + sidecar B + redis-server (the servers' CPU over the phase)\n"
    )
    return out + harness.noise_warning([r["sidecar"], r["redis"]])
