"""The sidecar against etcd 3.4 (Debian's ``etcd-server``), optional, in one run.

Skipped with a message when the ``etcd`` binary or the ``aetcd`` package (``pip install
-e .[bench]``; only its generated etcd v3 stubs ``aetcd.rpc`` are used, driven through
``grpc.aio`` like every other load here) is missing.

etcd runs as a single member on free loopback ports with its data directory on tmpfs
(/dev/shm when there is one): the bench's redis-server keeps nothing on disk either,
and etcd 3.4 has no flag to skip its WAL fsync, so tmpfs makes fsync nearly free. Logs
at ``error`` level.

- Keep-alive throughput: the heartbeat bench's closed-loop load shape against etcd's
  ``Lease.LeaseKeepAlive``: N leases (granted beforehand, TTL 600 s), one bidi stream
  each over the same channels, ``window`` keep-alives in flight per stream, acknowledged
  keep-alives per second after the warm-up. Alternating with the sidecar's heartbeat
  closed loop (``bench.heartbeat``), ``repeat`` times each; medians.
- Put -> watch event: ``bench.propagation``'s sequential shape against etcd: ``KV.Put``
  of one key on one channel, its event on a ``Watch`` stream on another channel, the
  next put once the event arrived. Alternating with the sidecar A -> B measurement.

Ratios are the sidecar's figure over etcd's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from types import TracebackType
from typing import Any, Self

import grpc

from bench import harness
from bench import heartbeat as hb
from bench import propagation as prop
from bench.harness import Gate, LoadWorkers, Result, ServerProcess, ServerSpec

LEASE_TTL_S = 600
KEY = b"/bench/propagation"


def missing() -> str:
    """Why the etcd comparison cannot run here ('' when it can)."""
    if shutil.which("etcd") is None:
        return "the `etcd` binary is not installed (Debian: apt-get install -y etcd-server)"
    try:
        import aetcd.rpc  # noqa: F401
    except ImportError:
        return "the `aetcd` package is not installed (pip install -e '.[bench]')"
    return ""


# --------------------------------------------------------------------------- etcd process


def _die_with_parent() -> None:
    """In the etcd child: SIGKILL when the bench process dies, so it never outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EtcdProcess:
    """One etcd member on free loopback ports in a temporary tmpfs directory."""

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = ""
        self.address = ""
        self.version = ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> Self:
        from tests.support.redis_proc import free_port

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._dir = tempfile.mkdtemp(prefix="bench-etcd-", dir=shm)
        client, peer = free_port(), free_port()
        self.address = f"127.0.0.1:{client}"
        argv = [
            "etcd",
            "--name", "bench",
            "--data-dir", f"{self._dir}/data",
            "--listen-client-urls", f"http://{self.address}",
            "--advertise-client-urls", f"http://{self.address}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
            "--logger", "zap",
            "--log-level", "error",
        ]  # fmt: skip
        self.version = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split("\n")[0]
        log = open(f"{self._dir}/etcd.log", "wb")
        self._proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self) -> None:
        from aetcd.rpc import rpc_pb2 as epb
        from aetcd.rpc import rpc_pb2_grpc as egrpc

        deadline = time.monotonic() + self._timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited:\n{self.log_tail()}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    egrpc.KVStub(ch).Range(epb.RangeRequest(key=b"/"), timeout=1)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    raise RuntimeError(f"etcd not ready in {self._timeout}s:\n{tail}") from exc
                time.sleep(0.1)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(f"{self._dir}/etcd.log") as f:
            return "".join(f.readlines()[-20:])
        return ""

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- load side


async def keepalive(
    gate: Gate,
    *,
    address: str,
    streams: int,
    window: int,
    channels: int,
    warmup_s: float,
    duration_s: float,
) -> Result:
    """Load-generator job: the heartbeat closed loop against etcd's LeaseKeepAlive."""
    from aetcd.rpc import rpc_pb2 as epb
    from aetcd.rpc import rpc_pb2_grpc as egrpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        stubs = [egrpc.LeaseStub(c) for c in chans]
        for c in chans:
            await asyncio.wait_for(c.channel_ready(), 10)
        leases = [
            (await stubs[0].LeaseGrant(epb.LeaseGrantRequest(TTL=LEASE_TTL_S), timeout=10)).ID
            for _ in range(streams)
        ]
        go_at = await gate.ready()
        start, end = go_at + warmup_s, go_at + warmup_s + duration_s
        acks = 0
        latencies: list[float] = []
        cpu: list[float] = []

        async def stream(stub: Any, lease_id: int) -> None:
            nonlocal acks
            await harness.sleep_until(go_at)
            call = stub.LeaseKeepAlive()
            sent: deque[float] = deque()
            credits = asyncio.Semaphore(window)

            async def reader() -> None:
                nonlocal acks
                while True:
                    resp = await call.read()
                    if not isinstance(resp, epb.LeaseKeepAliveResponse):  # grpc.aio.EOF
                        return
                    now = time.monotonic()
                    t0 = sent.popleft()
                    if start <= now < end:
                        acks += 1
                        latencies.append(now - t0)
                    credits.release()

            reading = asyncio.create_task(reader())
            req = epb.LeaseKeepAliveRequest(ID=lease_id)
            try:
                while time.monotonic() < end:
                    await credits.acquire()
                    sent.append(time.monotonic())
                    await call.write(req)
                await call.done_writing()
                await reading
            finally:
                reading.cancel()
                call.cancel()

        async def meter() -> None:
            await harness.sleep_until(start)
            cpu.append(time.process_time())
            await harness.sleep_until(end)
            cpu.append(time.process_time())

        await asyncio.wait_for(
            asyncio.gather(
                meter(), *(stream(stubs[i % channels], lid) for i, lid in enumerate(leases))
            ),
            warmup_s + duration_s + 30,
        )
    finally:
        for c in chans:
            await c.close(None)
    return {"acks": acks, "latencies": latencies, "client_cores": (cpu[1] - cpu[0]) / duration_s}


async def put_watch(gate: Gate, *, address: str, changes: int, timeout_s: float) -> Result:
    """Load-generator job: Put on one channel, the watch event on another, one at a time."""
    from aetcd.rpc import kv_pb2
    from aetcd.rpc import rpc_pb2 as epb
    from aetcd.rpc import rpc_pb2_grpc as egrpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(address, options=options) as wch,
        grpc.aio.insecure_channel(address, options=options) as rch,
    ):
        kv = egrpc.KVStub(wch)
        watch = egrpc.WatchStub(rch)
        await kv.Put(epb.PutRequest(key=KEY, value=b"-1"), timeout=10)
        arrivals = prop.Arrivals()
        created = asyncio.Event()
        call = watch.Watch()
        await call.write(epb.WatchRequest(create_request=epb.WatchCreateRequest(key=KEY)))

        async def read() -> None:
            while True:
                resp = await call.read()
                if not isinstance(resp, epb.WatchResponse):
                    return
                now = time.perf_counter()
                if resp.created:
                    created.set()
                for ev in resp.events:
                    if ev.type == kv_pb2.Event.PUT:
                        arrivals.arrived(int(ev.kv.value), now)

        reading = asyncio.create_task(read())
        try:
            await asyncio.wait_for(created.wait(), 10)
            if reading.done():
                reading.result()  # a reader that failed says why
            go_at = await gate.ready()
            await harness.sleep_until(go_at)

            async def put(i: int) -> None:
                await kv.Put(epb.PutRequest(key=KEY, value=str(i).encode()), timeout=10)

            return await asyncio.wait_for(
                prop.sequential(changes, timeout_s, arrivals, put), prop.BUDGET_S + 60
            )
        finally:
            reading.cancel()
            call.cancel()


# --------------------------------------------------------------------------- orchestration


def _keepalive_phase(workers: LoadWorkers, etcd: EtcdProcess, plan: hb.Plan) -> Result:
    metered = harness.Window({"server": etcd.pid}, plan.warmup_s, plan.duration_s)
    cores = metered.cores

    job = {
        "address": etcd.address,
        "streams": plan.streams,
        "window": plan.window,
        "channels": min(plan.channels, plan.streams),
        "warmup_s": plan.warmup_s,
        "duration_s": plan.duration_s,
    }
    (res,) = workers.run(
        keepalive, [job], timeout_s=plan.warmup_s + plan.duration_s + 120, during=metered.during
    )
    cores["client"] = round(res["client_cores"], 3)
    cores["others"] = harness.others(cores)
    return {
        "streams": plan.streams,
        "window": plan.window,
        "duration_s": plan.duration_s,
        "acks": res["acks"],
        "rate": res["acks"] / plan.duration_s,
        "latency": harness.latency_summary(res["latencies"]),
        "cores": cores,
    }


def run(hp: hb.Plan, pp: prop.Plan) -> Result:
    why = missing()
    if why:
        return {"skipped": why}
    from tests.support.redis_proc import RedisProcess

    result: Result = {"plan": {"heartbeat": hp.__dict__, "propagation": pp.__dict__}}
    node_ids = [f"hb-{i:04d}" for i in range(hp.streams)]
    runs: dict[str, list[Result]] = {}
    with (
        LoadWorkers(1) as workers,
        EtcdProcess() as etcd,
        RedisProcess() as redis_proc,
    ):
        result["etcd_version"] = etcd.version
        params = {"redis_url": redis_proc.url, "namespace": prop.NAMESPACE}
        with (
            ServerProcess(ServerSpec("sidecar", params)) as a,
            ServerProcess(ServerSpec("sidecar", params)) as b,
        ):
            for rep in range(hp.repeat):
                runs.setdefault("sidecar_heartbeat", []).append(
                    hb._phase(
                        workers, a, {"redis": redis_proc.pid}, node_ids=node_ids,
                        register=rep == 0, plan=hp, duration_s=hp.duration_s, window=hp.window,
                    )
                )  # fmt: skip
                runs.setdefault("etcd_keepalive", []).append(_keepalive_phase(workers, etcd, hp))
            pids = {"a": a.pid, "b": b.pid, "redis": redis_proc.pid}
            for rep in range(pp.repeat):
                runs.setdefault("sidecar_propagation", []).append(
                    prop.measure(
                        workers, prop.sidecar_changes, prop.sidecar_job(a, b, pp, rep), pids
                    )
                )
                job = {"address": etcd.address, "changes": pp.changes,
                       "timeout_s": pp.change_timeout_s}  # fmt: skip
                runs.setdefault("etcd_propagation", []).append(
                    prop.measure(workers, put_watch, job, {"etcd": etcd.pid})
                )
        result["rss_mb"] = {"etcd": harness.rss_mb(etcd.pid)}
    for name, phases in runs.items():
        key = ("latency", "p99_ms") if name.endswith("_propagation") else ("rate",)
        result[name] = harness.median_run(phases, *key)
    sh, ek = result["sidecar_heartbeat"]["rate"], result["etcd_keepalive"]["rate"]
    sp = result["sidecar_propagation"]["latency"]["p99_ms"]
    ep = result["etcd_propagation"]["latency"]["p99_ms"]
    result["ratio_heartbeat"] = sh / ek if ek else 0.0
    result["ratio_propagation_p99"] = sp / ep if ep else 0.0
    result["targets"] = {
        "heartbeat>=etcd_keepalive": result["ratio_heartbeat"] >= 1.0,
        "propagation_p99<=etcd": 0 < sp <= ep,
    }
    return result


def report(r: Result) -> str:
    if "skipped" in r:
        return f"etcd comparison skipped: {r['skipped']}\n"
    rows: list[list[Any]] = []
    for name in ("sidecar_heartbeat", "etcd_keepalive"):
        ph = r[name]
        c = ph["cores"]
        rows.append([
            name, ph["streams"], ph["window"], ph["rate"], ph["latency"]["p50_ms"],
            ph["latency"]["p99_ms"], c.get("server", 0), c.get("redis", "-"), c.get("client", 0),
            c.get("others", 0), " ".join(f"{v:.0f}" for v in ph["repetitions"]),
        ])  # fmt: skip
    out = harness.table(
        f"Sidecar Heartbeat vs {r['etcd_version']} LeaseKeepAlive (closed loop, acks/s)",
        ["run", "streams", "window", "acks/s", "p50 ms", "p99 ms", "srv cores", "redis",
         "client", "others", "acks/s of each"],
        rows,
    )  # fmt: skip
    t = r["targets"]
    sh = r["sidecar_heartbeat"]
    out += (
        f"ratio sidecar/etcd: {r['ratio_heartbeat']:.2f} "
        f"(target >= 1: {'met' if t['heartbeat>=etcd_keepalive'] else 'NOT met'}); sidecar acks "
        f"BUFFERED (degraded mode, not written to Redis): {sh.get('buffered_actions', 0)} of "
        f"{sh['acks']}; unanswered {sh.get('unanswered', 0)}; streams ended by an error: "
        f"{sh.get('stream_errors') or 0}\n\n"
    )
    out += harness.table(
        "Write -> event at another reader: sidecar A -> B vs etcd Put -> Watch (sequential, ms)",
        prop.HEADER,
        prop.rows(
            [
                ("sidecar A -> Redis -> sidecar B Watch", r["sidecar_propagation"]),
                ("etcd Put -> Watch event", r["etcd_propagation"]),
            ]
        ),
    )
    out += (
        f"ratio sidecar/etcd p99: {r['ratio_propagation_p99']:.2f} "
        f"(target <= 1: {'met' if t['propagation_p99<=etcd'] else 'NOT met'}); "
        f"etcd RSS {r['rss_mb']['etcd']:.0f} MiB\n"
    )
    phases = [r[k] for k in r if isinstance(r[k], dict) and "cores" in r[k]]
    return out + harness.noise_warning(phases)
