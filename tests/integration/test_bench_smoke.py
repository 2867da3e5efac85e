"""The benchmarks still run: ``python -m bench all --quick`` with tiny durations and sizes
(the optional etcd comparison left out: ``--skip-etcd``).

Only that they run and report positive figures under the documented JSON keys; the
figures themselves mean nothing at this size (see docs/benchmarks.md for real ones).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_bench_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        sys.executable, "-m", "bench", "all", "--quick", "--duration", "0.3",
        "--streams", "8", "--nodes", "300", "--changes", "50", "--skip-etcd",
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Heartbeat throughput" in proc.stdout
    assert "SelectNodes end to end" in proc.stdout
    assert "Schedule end to end" in proc.stdout
    assert "Write -> event at another reader" in proc.stdout
    assert "metrics cost" in proc.stdout

    data = json.loads(out.read_text())
    assert data["machine"]["nproc"] >= 1

    hb = data["heartbeat"]
    for run in ("echo", "sidecar", "echo_single", "sidecar_single", "sidecar_latency"):
        assert hb[run]["rate"] > 0, run
        assert hb[run]["latency"]["p99_ms"] > 0, run
    assert hb["sidecar"]["register_actions"] == 0
    assert hb["ratio"] > 0
    assert set(hb["targets"]) == {"throughput_ratio>=0.70", "p99_at_half_rate<5ms"}
    assert hb["rss_mb"]["sidecar"] > 0

    sel = data["select"]
    assert sel["preload"]["register_per_s"] > 0
    assert sel["preload"]["sidecar_start_s"] > 0
    for name, row in sel["in_process"].items():
        assert row["select"]["p99_ms"] > 0, name
        assert row["handler"]["p99_ms"] > 0, name
    assert set(sel["sidecar"]) == set(sel["echo"]) == set(sel["ratio"])
    for key, row in sel["sidecar"].items():
        assert row["calls_per_s"] > 0, key
        assert sel["echo"][key]["calls_per_s"] > 0, key
    assert sel["rss_mb"]["sidecar_loaded"] > 0
    assert set(sel["targets"]) == {"in_process_p99<1ms", "end_to_end_p99<5ms", "rss<100MB"}

    sch = data["schedule"]
    assert sch["preload"]["sidecar_start_s"] > 0
    assert set(sch["sidecar"]) == set(sch["echo"]) == set(sch["ratio"]) == {"x1", "x4"}
    for key, row in sch["sidecar"].items():
        assert row["calls_per_s"] > 0, key
        assert row["latency"]["p99_ms"] > 0, key
        assert sch["echo"][key]["calls_per_s"] > 0, key
    assert sum(sch["attempts"].values()) > 0

    prop = data["propagation"]
    for run in ("sidecar", "redis"):
        assert prop[run]["latency"]["n"] > 0, run
        assert prop[run]["latency"]["p99_ms"] > 0, run
    assert prop["ratio_p99"] > 0
    assert set(prop["targets"]) == {"p99<10ms"}
    tel = data["telemetry"]
    for workload in ("heartbeat", "select"):
        assert tel[f"{workload}_ratio"] > 0, workload
    assert tel["scrape"]["n"] > 0 and tel["scrape"]["bytes"] > 0
    assert "etcd" not in data


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fleet_bench_runs_and_writes_json(tmp_path: Path) -> None:
    """``python -m bench fleet --quick`` with a tiny fleet: two sidecars on one Redis, the
    echo baseline, targets and the JSON keys docs/benchmarks.md refers to."""
    out = tmp_path / "fleet.json"
    argv = [
        sys.executable, "-m", "bench", "fleet", "--quick", "--duration", "1",
        "--nodes", "60", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Heartbeat acks in the measured window" in proc.stdout
    assert "targets:" in proc.stdout

    fleet = json.loads(out.read_text())["fleet"]
    (run,) = fleet["runs"]
    assert run["nodes"] == 60
    for side in ("sidecar", "echo"):
        hb = run[side]["heartbeat"]["total"]
        assert hb["rate"] > 0, side
        assert hb["latency"]["p99_ms"] > 0, side
        assert set(hb["actions"]) == {"CONTINUE", "BUFFERED", "REGISTER"}, side
        assert run[side]["select"]["calls_per_s"] > 0, side
    assert len(run["sidecar"]["servers"]) == 2
    for server in run["sidecar"]["servers"]:
        assert server["transitions_run"] is not None
    assert run["sidecar"]["heartbeat"]["total"]["max_interval_ms"] >= 3000
    assert run["sidecar"]["rss_mb"]["sidecar0"] > 0
    assert run["ratio"]["ack_p99"] > 0 and run["ratio"]["ack_rate"] > 0
    assert set(run["targets"]) == {
        "buffered_acks==0", "degraded_transitions==0", "all_answered", "ack_p99<20ms",
        "select_p99<10ms",
    }  # fmt: skip
    assert fleet["largest_ok"] in (0, 60)
