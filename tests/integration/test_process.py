"""``python -m registry serve`` as an operator runs it: embedded Redis, SIGTERM, restart;
SIGTERM and SIGINT while it still waits for Redis, and a second signal during a shutdown
that hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from registry_client.v1 import registry_pb2 as pb
from registry_client.v1 import registry_pb2_grpc as pb_grpc
from tests.conftest import SidecarFactory
from tests.support.redis_proc import RedisProcess, free_port

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


def start_logging_to(log_path: Path, *argv: str) -> subprocess.Popen[bytes]:
    """``python *argv`` with its output in ``log_path``: a file can be polled, a pipe
    cannot without a reader thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["REGISTRY_DATA_DIR"] = str(log_path.parent / "data")
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_logged(proc: subprocess.Popen[bytes], log_path: Path, text: str) -> None:
    deadline = time.monotonic() + 20
    while text not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log_path.read_text()}"
        time.sleep(0.05)


def exit_within(proc: subprocess.Popen[bytes], log_path: Path, seconds: float) -> int:
    sent = time.monotonic()
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {seconds} s after the signal:\n{log_path.read_text()}")
    assert time.monotonic() - sent < seconds
    return code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_waiting_for_redis_stops_the_sidecar(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Start-up waits for Redis as long as it takes; a stop signal must not."""
    log_path = tmp_path / "sidecar.log"
    nobody = free_port()  # nothing listens here
    proc = start_logging_to(
        log_path,
        "-m",
        "registry",
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--redis-url",
        f"redis://127.0.0.1:{nobody}/0",
    )
    try:
        wait_logged(proc, log_path, "waiting for Redis")
        proc.send_signal(sig)
        code = exit_within(proc, log_path, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert code == 0, log
    assert "stopped during start-up" in log


# The real Sidecar shuts down within its bounds, so a hanging one stands in for it:
# `serve` imports registry.server lazily, which lets this script put its own in place.
HANGING_SHUTDOWN = textwrap.dedent(
    """
    import asyncio, logging, sys, types
    from registry import cli

    class Sidecar:
        def __init__(self, settings):
            pass

        async def start(self):
            logging.getLogger("fake").warning("fake started")

        async def aclose(self):
            logging.getLogger("fake").warning("fake closing")
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if sys.argv[1] == "cancellable":
                        raise  # else: ignores cancellation, so only os._exit ends it

    fake = types.ModuleType("registry.server")
    fake.Sidecar = Sidecar
    sys.modules["registry.server"] = fake
    sys.exit(cli.main(["serve", "--listen", "127.0.0.1:0"]))
    """
)


@pytest.mark.parametrize("hang", ["cancellable", "stubborn"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_cuts_a_hanging_shutdown_short(
    tmp_path: Path, sig: signal.Signals, hang: str
) -> None:
    log_path = tmp_path / "sidecar.log"
    proc = start_logging_to(log_path, "-c", HANGING_SHUTDOWN, hang)
    try:
        wait_logged(proc, log_path, "fake started")
        proc.send_signal(sig)
        wait_logged(proc, log_path, "fake closing")
        time.sleep(0.2)
        assert proc.poll() is None, "the first signal waits for the shutdown"
        proc.send_signal(sig)
        # Cancelled, the shutdown unwinds at once; ignoring cancellation, it gets 2 s.
        code = exit_within(proc, log_path, 2 if hang == "cancellable" else 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert code == 128 + sig.value, log
    assert f"{sig.name} received again" in log


async def test_a_busy_port_is_a_start_up_error(
    sidecar_factory: SidecarFactory, shared_redis: RedisProcess, namespace: str
) -> None:
    """gRPC sets SO_REUSEPORT by default, so a second sidecar would share the port and
    clients would reach either at random; the sidecar turns it off."""
    first = await sidecar_factory(shared_redis.url, namespace)
    with pytest.raises(OSError, match="cannot listen"):
        await sidecar_factory(shared_redis.url, namespace, listen=first.address)
