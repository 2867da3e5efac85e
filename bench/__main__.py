"""``python -m bench [PHASE] [--quick] [--json PATH]`` (or ``make bench``); PHASE is one of
heartbeat, select, schedule, propagation, telemetry, etcd, all (the default), or fleet
(a 10,000-node fleet on two sidecars; not part of ``all``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

from bench import etcd as etcd_bench
from bench import fleet as fleet_bench
from bench import harness
from bench import heartbeat as hb
from bench import propagation as prop
from bench import schedule as sched
from bench import select as sel
from bench import telemetry as tel

PHASES = [
    "heartbeat", "select", "schedule", "propagation", "telemetry", "etcd", "all", "fleet",
]  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("which", nargs="?", default="all", choices=PHASES)
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds per phase")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--duration", type=float, help="seconds per measured phase (overrides)")
    p.add_argument("--streams", type=int, help="heartbeat streams (default 200)")
    p.add_argument("--window", type=int, help="heartbeats in flight per stream (default 8)")
    p.add_argument("--channels", type=int, help="client connections for the streams (8)")
    p.add_argument("--material", type=float, help="fraction of material heartbeats (0.05)")
    p.add_argument("--nodes", type=int, help="fleet size for select, schedule and fleet (10000)")
    p.add_argument("--changes", type=int, help="changes per propagation run (default 1000)")
    p.add_argument(
        "--skip-etcd", action="store_true", help="leave the etcd comparison out of `all`"
    )
    p.add_argument(
        "--repeat", type=int, help="repetitions per phase, echo and sidecar alternating (3)"
    )
    p.add_argument(
        "--sweep",
        metavar="N,N,...",
        help="fleet: run these fleet sizes in turn and report the largest that met every target",
    )
    p.add_argument(
        "--freeze-at",
        type=float,
        metavar="S",
        help="fleet: a fault run; S seconds into the window Redis is frozen (SIGSTOP) for 2 s "
        "under the load, and how soon each sidecar noticed is reported",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="cProfile the sidecar during its load phases, write .prof files to DIR and print "
        "the top functions (slows the sidecar: its figures are then not comparable)",
    )
    return p.parse_args(argv)


def plans(args: argparse.Namespace) -> tuple[hb.Plan, sel.Plan, sched.Plan, prop.Plan]:
    hp, sp, cp, pp = hb.Plan(), sel.Plan(), sched.Plan(), prop.Plan()
    if args.quick:
        cp = dataclasses.replace(cp, warmup_s=0.3, duration_s=1.5, repeat=1)
        pp = dataclasses.replace(pp, changes=200, repeat=1)
        hp = dataclasses.replace(hp, warmup_s=0.5, duration_s=3.0, single_duration_s=2.0, repeat=1)
        sp = dataclasses.replace(
            sp, calls=500, inproc_budget_s=1.0, warmup_s=0.3, duration_s=1.5, repeat=1
        )
    if args.duration is not None:
        d = args.duration
        hp = dataclasses.replace(hp, warmup_s=min(hp.warmup_s, d / 2), duration_s=d,
                                 single_duration_s=d)  # fmt: skip
        sp = dataclasses.replace(sp, warmup_s=min(sp.warmup_s, d / 2), duration_s=d,
                                 inproc_budget_s=d)  # fmt: skip
        cp = dataclasses.replace(cp, warmup_s=min(cp.warmup_s, d / 2), duration_s=d)
    hp = dataclasses.replace(
        hp,
        streams=args.streams or hp.streams,
        window=args.window or hp.window,
        channels=args.channels or hp.channels,
        material=hp.material if args.material is None else args.material,
    )
    sp = dataclasses.replace(sp, nodes=args.nodes or sp.nodes)
    cp = dataclasses.replace(cp, nodes=args.nodes or cp.nodes)
    pp = dataclasses.replace(pp, changes=args.changes or pp.changes)
    if args.repeat:
        hp = dataclasses.replace(hp, repeat=args.repeat)
        sp = dataclasses.replace(sp, repeat=args.repeat)
        cp = dataclasses.replace(cp, repeat=args.repeat)
        pp = dataclasses.replace(pp, repeat=args.repeat)
    return hp, sp, cp, pp


def fleet_plan(args: argparse.Namespace) -> fleet_bench.Plan:
    fp = fleet_bench.Plan()
    if args.quick:
        fp = dataclasses.replace(fp, nodes=500, warmup_s=3.5, duration_s=4.0)
    if args.duration is not None:
        # The warm-up stays: it must cover the first interval, over which streams start.
        fp = dataclasses.replace(fp, duration_s=args.duration)
    if args.nodes:
        fp = dataclasses.replace(fp, nodes=args.nodes)
    if args.material is not None:
        fp = dataclasses.replace(fp, material=args.material)
    if args.freeze_at is not None:
        fp = dataclasses.replace(fp, freeze_at_s=args.freeze_at)
    if args.sweep:
        sizes = tuple(int(v.replace("_", "")) for v in args.sweep.split(",") if v.strip())
        fp = dataclasses.replace(fp, sweep=tuple(sorted(set(sizes))))
    return fp


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    hp, sp, cp, pp = plans(args)
    profile_dir = args.profile
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        profile_dir = os.path.abspath(profile_dir)
    out: dict[str, Any] = {
        "command": harness.python_command(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": harness.machine(),
    }
    m = out["machine"]
    print(
        f"machine: {m['nproc']} cpu ({m['cpu_model']}), {m['mem_gib']} GiB, Python {m['python']}, "
        f"grpcio {m['grpcio']}\n",
        flush=True,
    )
    started = time.monotonic()
    if args.which in ("heartbeat", "all"):
        out["heartbeat"] = hb.run(hp, profile_dir=profile_dir)
        print(hb.report(out["heartbeat"]), flush=True)
        _print_profile(out["heartbeat"])
    if args.which in ("select", "all"):
        out["select"] = sel.run(sp, profile_dir=profile_dir)
        print(sel.report(out["select"]), flush=True)
        _print_profile(out["select"])
    if args.which in ("schedule", "all"):
        out["schedule"] = sched.run(cp, profile_dir=profile_dir)
        print(sched.report(out["schedule"]), flush=True)
        _print_profile(out["schedule"])
    if args.which in ("propagation", "all"):
        out["propagation"] = prop.run(pp)
        print(prop.report(out["propagation"]), flush=True)
    if args.which in ("telemetry", "all"):
        tp = tel.Plan(
            heartbeat=hp,
            select=dataclasses.replace(sp, nodes=min(sp.nodes, 2_000), concurrency=(4,)),
            repeat=hp.repeat,
        )
        out["telemetry"] = tel.run(tp)
        print(tel.report(out["telemetry"]), flush=True)
    if args.which == "etcd" or (args.which == "all" and not args.skip_etcd):
        out["etcd"] = etcd_bench.run(hp, pp)
        print(etcd_bench.report(out["etcd"]), flush=True)
    if args.which == "fleet":
        out["fleet"] = fleet_bench.run(fleet_plan(args))
        print(fleet_bench.report(out["fleet"]), flush=True)
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    print(f"done in {out['elapsed_s']} s")
    if args.json:
        _write_json(args.json, out)
    return 0


def _print_profile(result: dict[str, Any]) -> None:
    path = result.get("profile")
    if not path:
        return
    rows = [[f, own, cum, calls] for f, own, cum, calls in harness.top_functions(path, 15)]
    print(harness.table(f"sidecar profile {path} (by own time)",
                        ["function", "own s", "cum s", "calls"], rows))  # fmt: skip


def _write_json(path: str, data: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
