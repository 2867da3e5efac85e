"""What metrics cost: one workload against two sidecars on one Redis, one with metrics off
and one with ``--metrics-listen`` scraped every second (as Prometheus would), in
alternating repetitions so a busy neighbour skews both alike.

Two workloads: heartbeat streams (the hottest path: a Redis-latency record per batch)
and closed-loop SelectNodes calls (the RPC timer interceptor and its histogram per
call). The figure is the ratio metered / plain; 1.0 means metrics are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import urllib.request
from typing import Any

from bench import harness
from bench import heartbeat as hb
from bench import select as sel
from bench.harness import LoadWorkers, Result, ServerProcess, ServerSpec


@dataclasses.dataclass(frozen=True)
class Plan:
    heartbeat: hb.Plan = dataclasses.field(default_factory=hb.Plan)
    select: sel.Plan = dataclasses.field(
        default_factory=lambda: sel.Plan(nodes=2_000, concurrency=(4,))
    )
    scrape_interval_s: float = 1.0
    repeat: int = 3


class Scraper:
    """GETs ``/metrics`` every interval in a thread while a phase runs."""

    def __init__(self, url: str, interval_s: float) -> None:
        self._url = url
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.durations: list[float] = []
        self.bytes = 0

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            started = time.perf_counter()
            with urllib.request.urlopen(self._url, timeout=5) as reply:
                self.bytes = len(reply.read())
            self.durations.append(time.perf_counter() - started)


def run(plan: Plan) -> Result:
    from tests.support.redis_proc import RedisProcess, free_port

    hp, sp = plan.heartbeat, plan.select
    node_ids = [f"hb-{i:04d}" for i in range(hp.streams)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    runs: dict[str, list[Result]] = {}
    scrapes: list[float] = []
    scrape_bytes = 0
    with RedisProcess() as redis_proc, LoadWorkers(1) as workers:
        asyncio.run(sel.load_fleet(redis_proc.url, sp))
        base = {"redis_url": redis_proc.url, "namespace": sel.NAMESPACE}
        with (
            ServerProcess(ServerSpec("sidecar", base)) as plain,
            ServerProcess(
                ServerSpec("sidecar", {**base, "metrics_listen": f"127.0.0.1:{port}"})
            ) as metered,
        ):
            others = {"redis": redis_proc.pid}
            selector = next(iter(sel.SELECTORS))
            conc = sp.concurrency[0]
            for rep in range(plan.repeat):
                for name, server in (("plain", plain), ("metered", metered)):
                    scraper = Scraper(url, plan.scrape_interval_s)
                    with scraper if name == "metered" else contextlib.nullcontext():
                        runs.setdefault(f"heartbeat {name}", []).append(
                            hb._phase(
                                workers, server, others, node_ids=node_ids, register=rep == 0,
                                plan=hp, duration_s=hp.duration_s, window=hp.window,
                            )
                        )  # fmt: skip
                        runs.setdefault(f"select {name}", []).append(
                            sel._e2e(workers, server, others, sp, selector, conc)
                        )
                    if name == "metered":
                        scrapes += scraper.durations
                        scrape_bytes = scraper.bytes
            rss = {"plain": harness.rss_mb(plain.pid), "metered": harness.rss_mb(metered.pid)}
    result: Result = {
        "plan": {"streams": hp.streams, "nodes": sp.nodes, "select_callers": conc,
                 "repeat": plan.repeat, "scrape_interval_s": plan.scrape_interval_s},
    }  # fmt: skip
    result["heartbeat"] = {
        side: harness.median_run(runs[f"heartbeat {side}"], "rate") for side in ("plain", "metered")
    }
    result["select"] = {
        side: harness.median_run(runs[f"select {side}"], "calls_per_s")
        for side in ("plain", "metered")
    }
    h, s = result["heartbeat"], result["select"]
    result["heartbeat_ratio"] = h["metered"]["rate"] / h["plain"]["rate"]
    result["select_ratio"] = s["metered"]["calls_per_s"] / s["plain"]["calls_per_s"]
    result["scrape"] = {**harness.latency_summary(scrapes), "bytes": scrape_bytes}
    result["rss_mb"] = rss
    return result


def report(r: Result) -> str:
    h, s = r["heartbeat"], r["select"]
    rows: list[list[Any]] = [
        ["heartbeats (acks/s)", round(h["plain"]["rate"]), round(h["metered"]["rate"]),
         f"{r['heartbeat_ratio']:.2f}"],
        [f"SelectNodes x{r['plan']['select_callers']} (calls/s)", round(s["plain"]["calls_per_s"]),
         round(s["metered"]["calls_per_s"]), f"{r['select_ratio']:.2f}"],
        ["SelectNodes p99 (ms)", round(s["plain"]["latency"]["p99_ms"], 2),
         round(s["metered"]["latency"]["p99_ms"], 2), ""],
        ["RSS (MiB)", r["rss_mb"]["plain"], r["rss_mb"]["metered"], ""],
    ]  # fmt: skip
    sc = r["scrape"]
    return harness.table(
        f"metrics cost (scrape every {r['plan']['scrape_interval_s']:g} s: "
        f"p50 {sc.get('p50_ms', 0):.1f} ms, max {sc.get('max_ms', 0):.1f} ms, {sc['bytes']} bytes)",
        ["workload", "metrics off", "metrics on", "on / off"],
        rows,
    )
