"""``python -m registry serve`` as an operator runs it: embedded Redis, SIGTERM, restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.support.redis_proc import free_port

ROOT = Path(__file__).resolve().parents[2]


def start(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "registry", "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def health(port: int) -> int:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "registry",
            "health",
            "--target",
            f"127.0.0.1:{port}",
            "--timeout",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        check=False,
    ).returncode


def wait_serving(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 20
    while health(port) != 0:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "sidecar did not report SERVING"
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    return out.decode()


def embedded_redis_pids(data_dir: Path) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-f", f"redis-server.*{data_dir}"], capture_output=True, text=True, check=False
    )
    return found.stdout.split()


@pytest.mark.slow
def test_serve_with_embedded_redis_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    assert health(port) != 0, "health must fail when nothing listens"
    proc = start(data_dir, port)
    try:
        wait_serving(proc, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            stub.RegisterNode(
                pb.RegisterNodeRequest(
                    node=pb.Node(node_id="keep-me", capacity=1), ttl_ms=3_600_000
                )
            )
    finally:
        log = stop(proc)
    assert proc.returncode == 0, log
    assert "shutting down" in log
    assert embedded_redis_pids(data_dir) == [], "the embedded redis-server must stop too"

    proc = start(data_dir, port)
    try:
        wait_serving(proc, port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            got = stub.GetNode(pb.GetNodeRequest(node_id="keep-me"))
            assert got.node.capacity == 1, "append-only file keeps the registry across restarts"
    finally:
        stop(proc)
    assert proc.returncode == 0
