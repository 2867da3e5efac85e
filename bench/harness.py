"""Shared machinery: server and load-generator child processes, /proc figures, tables.

Every process under test (a sidecar or the echo server) and every load generator runs in
a child of its own, started with ``spawn`` so nothing (event loop, gRPC core state, GIL)
is shared with the orchestrating parent. Children stop by themselves: a server when the
parent says so, closes the pipe or its lifetime runs out; a load generator when its job's
deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import math
import multiprocessing as mp
import os
import platform
import pstats
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

CTX = mp.get_context("spawn")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKER_IDLE_S = 600.0
"""A load worker with no job for this long exits by itself."""

Result = dict[str, Any]
LoadTarget = Callable[..., Awaitable[Result]]


# --------------------------------------------------------------------------- figures


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def latency_summary(samples: Sequence[float]) -> dict[str, float]:
    """Milliseconds from samples in seconds."""
    ordered = sorted(samples)
    mean = sum(ordered) / len(ordered) if ordered else 0.0
    return {
        "n": len(ordered),
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p90_ms": percentile(ordered, 0.90) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "max_ms": (ordered[-1] if ordered else 0.0) * 1e3,
        "mean_ms": mean * 1e3,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all threads, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # Fields after the command name start at field 3 (state); utime is 14, stime 15.
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat), since boot:
    user + nice + system + irq + softirq (idle, iowait, steal and guest excluded)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / CLK_TCK


class CpuMeter:
    """CPU cores used by some processes between ``start`` and ``stop``, and by the whole
    machine (``machine``), so a busy neighbour shows up next to the figures it skews."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid}
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}
        self._busy0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        self._busy0 = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-9)
        out = {
            name: round((cpu_seconds(pid) - self._cpu0[name]) / wall, 3)
            for name, pid in self._pids.items()
        }
        out["machine"] = round((machine_busy_seconds() - self._busy0) / wall, 3)
        return out


class Window:
    """Meters CPU over the measured window of one load run, after its warm-up: pass
    ``during`` to ``LoadWorkers.run``, read ``cores`` once the run is over."""

    def __init__(self, pids: Mapping[str, int | None], warmup_s: float, duration_s: float) -> None:
        self._meter = CpuMeter(pids)
        self._warmup_s = warmup_s
        self._duration_s = duration_s
        self.cores: dict[str, float] = {}

    def during(self, go_at: float) -> None:
        time.sleep(max(go_at + self._warmup_s - time.monotonic(), 0))
        self._meter.start()
        time.sleep(self._duration_s)
        self.cores.update(self._meter.stop())


def median_run(runs: Sequence[Result], *key: str) -> Result:
    """The repetition whose ``key`` figure is the median (the lower one for an even count),
    with every repetition's figure under ``repetitions``."""

    def figure(run: Result) -> float:
        value: Any = run
        for part in key:
            value = value[part]
        return float(value)

    ordered = sorted(runs, key=figure)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repetitions"] = [figure(r) for r in runs]
    return chosen


NOISE_CORES = 0.25
"""Above this many cores used by other processes in a measured window, a report warns."""


def noise_warning(phases: Sequence[Mapping[str, Any]]) -> str:
    """A warning when a reported (median) run shared the machine with a busy neighbour."""
    worst = max((p["cores"].get("others", 0.0) for p in phases), default=0.0)
    if worst <= NOISE_CORES:
        return ""
    return (
        f"WARNING: other processes used up to {worst:.2f} cores during measured windows; "
        "these figures are skewed, run again on a quiet machine\n"
    )


def others(cores: Mapping[str, float]) -> float:
    """Cores the machine spent on processes outside the benchmark (noise)."""
    ours = sum(v for k, v in cores.items() if k not in ("machine", "others"))
    return round(max(cores.get("machine", 0.0) - ours, 0.0), 3)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    import grpc
    import redis

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "kernel": platform.release(),
    }


def sleep_until(deadline: float) -> Awaitable[None]:
    return asyncio.sleep(max(deadline - time.monotonic(), 0.0))


async def readable(conn: Connection, timeout_s: float) -> bool:
    """Wait without polling until the pipe has a message (or was closed); False on timeout."""
    if conn.poll():
        return True
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        async with asyncio.timeout(timeout_s):
            await ready.wait()
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(conn.fileno())
    return True


# --------------------------------------------------------------------------- tables


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    kind: str
    """``echo`` or ``sidecar``."""
    params: dict[str, Any]
    lifetime_s: float = 600.0
    """The child exits by itself after this long, whatever the parent does."""


class ServerProcess:
    """A server under test in a child process: ``with ServerProcess(spec) as srv``."""

    def __init__(self, spec: ServerSpec, *, start_timeout_s: float = 60.0) -> None:
        self.spec = spec
        self._timeout = start_timeout_s
        self._proc: Any = None
        self._conn: Connection | None = None
        self.address = ""
        self.start_s = 0.0
        self.info: Result = {}

    @property
    def pid(self) -> int:
        assert self._proc is not None and self._proc.pid is not None
        return int(self._proc.pid)

    def __enter__(self) -> Self:
        parent, child = CTX.Pipe()
        self._conn = parent
        self._proc = CTX.Process(
            target=_server_child, args=(self.spec, child), daemon=True, name=self.spec.kind
        )
        self._proc.start()
        child.close()
        if not parent.poll(self._timeout):
            self.close()
            raise RuntimeError(f"{self.spec.kind} server did not start in {self._timeout}s")
        msg = parent.recv()
        if "error" in msg:
            self.close()
            raise RuntimeError(f"{self.spec.kind} server failed:\n{msg['error']}")
        self.address, self.start_s, self.info = msg["address"], msg["start_s"], msg
        return self

    def command(self, *msg: Any) -> Any:
        """Send a command (``profile-on``, ``profile-off PATH``) and wait for its answer."""
        assert self._conn is not None
        self._conn.send(msg)
        if not self._conn.poll(60):
            raise RuntimeError(f"{self.spec.kind} server did not answer {msg[0]}")
        return self._conn.recv()

    def close(self) -> None:
        if self._proc is None:
            return
        if self._conn is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(("stop",))
            self._conn.close()
            self._conn = None
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._proc = None

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _server_child(spec: ServerSpec, conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(spec, conn))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send({"error": traceback.format_exc()})
        raise


@contextlib.asynccontextmanager
async def _server(spec: ServerSpec) -> AsyncIterator[str]:
    if spec.kind == "echo":
        from bench.echo import serving

        params = spec.params
        async with serving(params.get("canned", {}), params.get("schedule", b"")) as address:
            yield address
    elif spec.kind == "sidecar":
        from registry.config import Settings
        from registry.server import Sidecar

        # A data directory of its own: each sidecar locks its write-buffer journal there.
        data_dir = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
        settings = Settings(**{"listen": "127.0.0.1:0", "data_dir": data_dir, **spec.params})
        async with Sidecar(settings) as sidecar:
            yield sidecar.address
    else:
        raise ValueError(f"unknown server kind {spec.kind!r}")


async def _serve(spec: ServerSpec, conn: Connection) -> None:
    started = time.perf_counter()
    deadline = time.monotonic() + spec.lifetime_s
    async with _server(spec) as address:
        conn.send({"address": address, "start_s": time.perf_counter() - started})
        profiler: cProfile.Profile | None = None
        while await readable(conn, deadline - time.monotonic()):
            try:
                msg = conn.recv()
            except EOFError:
                break  # the parent went away
            if msg[0] == "stop":
                break
            if msg[0] == "profile-on":
                profiler = cProfile.Profile()
                profiler.enable()
                conn.send("ok")
            elif msg[0] == "profile-off" and profiler is not None:
                profiler.disable()
                profiler.dump_stats(msg[1])
                profiler = None
                conn.send("ok")
            else:
                conn.send(f"unknown command {msg[0]!r}")


def top_functions(path: str, limit: int = 12) -> list[tuple[str, float, float, int]]:
    """(function, own seconds, cumulative seconds, calls), by own time."""
    stats = pstats.Stats(path)
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({name})"
        rows.append((where, tt, ct, nc))
    rows.sort(key=lambda r: r[1], reverse=True)
    return rows[:limit]


# --------------------------------------------------------------------------- load generators


class Gate:
    """A load job's start line: report ready, then wait for the common start time."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def ready(self) -> float:
        self._conn.send("ready")
        await readable(self._conn, 60.0)
        go_at: float = self._conn.recv()
        return go_at


class LoadWorkers:
    """Load-generator child processes, reused for several jobs (one asyncio loop each)."""

    def __init__(self, count: int = 1) -> None:
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        for i in range(count):
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=_worker_child, args=(child,), daemon=True, name=f"load{i}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def __len__(self) -> int:
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def run(
        self,
        target: LoadTarget,
        jobs: Sequence[Mapping[str, Any]],
        *,
        timeout_s: float,
        during: Callable[[float], None] | None = None,
    ) -> list[Result]:
        """Run ``target(gate, **job)`` in each worker (one job per worker) at one start time.

        ``during(go_at)`` runs in the parent between the start and the results (to sample
        the server's CPU over the measured window).
        """
        assert len(jobs) <= len(self._conns)
        conns = self._conns[: len(jobs)]
        deadline = time.monotonic() + timeout_s
        for conn, job in zip(conns, jobs, strict=True):
            conn.send((target, dict(job)))
        for conn in conns:
            msg = self._recv(conn, deadline)
            if msg != "ready":
                raise RuntimeError(f"load worker failed before start:\n{_error(msg)}")
        go_at = time.monotonic() + 0.05
        for conn in conns:
            conn.send(go_at)
        if during is not None:
            during(go_at)
        results = []
        for conn in conns:
            msg = self._recv(conn, deadline)
            if not isinstance(msg, dict) or "error" in msg:
                raise RuntimeError(f"load worker failed:\n{_error(msg)}")
            results.append(msg["ok"])
        return results

    @staticmethod
    def _recv(conn: Connection, deadline: float) -> Any:
        if not conn.poll(max(deadline - time.monotonic(), 0.0)):
            raise TimeoutError("load worker did not answer in time")
        return conn.recv()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
            conn.close()
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._procs.clear()
        self._conns.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _error(msg: Any) -> str:
    return str(msg["error"]) if isinstance(msg, dict) and "error" in msg else repr(msg)


def _worker_child(conn: Connection) -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_worker_main(conn))


async def _worker_main(conn: Connection) -> None:
    while await readable(conn, WORKER_IDLE_S):
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        target, job = msg
        try:
            result = await target(Gate(conn), **job)
        except Exception:
            conn.send({"error": traceback.format_exc()})
        else:
            conn.send({"ok": result})


def python_command() -> str:
    return " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]])


def chunks(items: Sequence[Any], n: int) -> Iterator[list[Any]]:
    """Split into ``n`` round-robin shares."""
    for i in range(n):
        yield list(items[i::n])
