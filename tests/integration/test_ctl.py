"""``registry ctl`` against a real sidecar and a real redis-server.

The sidecar runs on the test's event loop, so the CLI (which calls ``asyncio.run``) runs in
a worker thread with its own loop: ``await ctl(sidecar, "nodes", "list")``. One test runs
the console entry point in a subprocess to prove the wiring.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from registry import cli
from registry import ctl as ctl_module
from registry.server import Sidecar
from registry_client import RegistryClient, pb
from tests.support.redis_proc import free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def run_ctl(*argv: str) -> Result:
    """``registry ctl ARGV`` in a thread (the sidecar needs this loop free meanwhile)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(ctl_module.main, list(argv), stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


async def ctl(sidecar: Sidecar, *argv: str) -> Result:
    return await run_ctl("--target", sidecar.address, *argv)


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(sidecar.address) as c:
        yield c


def make_node(node_id: str, *, capacity: int = 2, **labels: str) -> pb.Node:
    return pb.Node(
        node_id=node_id,
        address=f"10.0.0.1:{9000 + len(node_id)}",
        capacity=capacity,
        pools=["p"],
        lang_pairs=[pb.LanguagePair(src="en", tgt="de")],
        services=[pb.InstalledService(name="mt", type="engine", version="1")],
        labels={"zone": "a", **labels},
    )


async def seed(client: RegistryClient, *node_ids: str, capacity: int = 2) -> None:
    for node_id in node_ids:
        await client.register_node(make_node(node_id, capacity=capacity), ttl_ms=60_000)


async def test_nodes_list_and_get(client: RegistryClient, sidecar: Sidecar) -> None:
    await seed(client, "n1", "n2")

    table = await ctl(sidecar, "nodes", "list")
    assert table.code == 0, table.err
    header, *rows = table.out.splitlines()
    assert header.split() == list(ctl_module.fmt.NODE_HEADERS)
    assert [r.split()[:3] for r in rows] == [["n1", "ONLINE", "0/2"], ["n2", "ONLINE", "0/2"]]

    listed = await ctl(sidecar, "nodes", "list", "--pool", "p", "--lang", "en:de", "--json")
    assert listed.code == 0, listed.err
    doc = listed.json()
    assert [n["nodeId"] for n in doc["nodes"]] == ["n1", "n2"]
    assert doc["nodes"][0]["runningJobs"] == 0  # zero values are printed too
    assert int(doc["freshness"]["version"]) > 0  # int64 is a string in protobuf JSON

    none = await ctl(sidecar, "nodes", "list", "--status", "draining", "--label", "zone=a")
    assert (none.code, none.out.strip()) == (0, "no nodes")

    shown = await ctl(sidecar, "nodes", "get", "n1")
    assert shown.code == 0, shown.err
    lines = dict(line.split(None, 1) for line in shown.out.splitlines())
    assert lines["status"] == "ONLINE"
    assert lines["services"] == "mt/engine@1"
    assert lines["labels"] == "zone=a"

    as_json = await ctl(sidecar, "--json", "nodes", "get", "n2")
    assert as_json.json()["node"]["langPairs"] == [{"src": "en", "tgt": "de"}]


async def test_error_exit_codes(client: RegistryClient, sidecar: Sidecar) -> None:
    await seed(client, "n1")

    missing = await ctl(sidecar, "nodes", "get", "nope")
    assert missing.code == ctl_module.EXIT_NOT_FOUND == 3
    assert missing.out == ""
    assert missing.err.startswith("registry ctl: NOT_FOUND: ")
    assert len(missing.err.splitlines()) == 1
    assert (await ctl(sidecar, "pools", "get", "nope")).code == 3

    bad = await ctl(sidecar, "select", "--pool", "p", "--min-health", "2")
    assert bad.code == ctl_module.EXIT_REFUSED == 4
    assert "INVALID_ARGUMENT" in bad.err and "min_health" in bad.err

    await client.drain_node("n1")
    refused = await ctl(sidecar, "reserve", "n1", "job-1")
    assert refused.code == 4
    assert "FAILED_PRECONDITION" in refused.err

    usage = await ctl(sidecar, "select", "--lang", "en")  # argparse refuses it: no call made
    assert usage.code == ctl_module.EXIT_USAGE == 2


async def test_select_and_schedule(client: RegistryClient, sidecar: Sidecar) -> None:
    await seed(client, "n1", "n2", capacity=1)

    picked = await ctl(sidecar, "select", "--pool", "p", "--lang", "en:de", "--count", "2")
    assert picked.code == 0, picked.err
    *rows, summary = picked.out.splitlines()
    assert sorted(r.split()[0] for r in rows[1:]) == ["n1", "n2"]
    assert summary == "considered=2 eligible=2"

    excluded = await ctl(
        sidecar, "--json", "select", "--pool", "p", "--exclude", "n1", "--service", "mt"
    )
    doc = excluded.json()
    assert [n["nodeId"] for n in doc["nodes"]] == ["n2"]
    assert doc["breakdown"]["excludedId"] == 1

    first = await ctl(sidecar, "schedule", "job-1", "--pool", "p", "--lease-ms", "60000")
    assert first.code == 0, first.err
    fields = dict(line.split(None, 1) for line in first.out.splitlines())
    assert fields["created"] == "yes"
    node_id = fields["node_id"]

    again = await ctl(sidecar, "schedule", "job-1", "--pool", "p", "--json")
    assert again.json()["node"]["nodeId"] == node_id
    assert again.json()["created"] is False

    await ctl(sidecar, "schedule", "job-2", "--pool", "p")
    full = await ctl(sidecar, "schedule", "job-3", "--pool", "p")
    assert full.code == ctl_module.EXIT_CONFLICT == 5
    assert "RESOURCE_EXHAUSTED" in full.err
    assert "considered=2 eligible=0 excluded: full=2" in full.err  # the status detail

    released = await ctl(sidecar, "release", node_id, "job-1")
    assert released.code == 0 and "released" in released.out


async def test_drain_and_deregister(client: RegistryClient, sidecar: Sidecar) -> None:
    await seed(client, "n1")

    drained = await ctl(sidecar, "drain", "n1")
    assert drained.code == 0, drained.err
    assert drained.out.strip() == "n1: DRAINING, 0/2 jobs running"
    assert (await client.get_node("n1")).node.status == pb.NODE_STATUS_DRAINING

    gone = await ctl(sidecar, "deregister", "n1", "--json")
    assert gone.code == 0 and gone.json()["existed"] is True
    assert (await ctl(sidecar, "nodes", "get", "n1")).code == 3

    again = await ctl(sidecar, "deregister", "n1")
    assert (again.code, again.out.strip()) == (0, "n1: was not registered (nothing changed)")


async def test_pools_put_list_get(sidecar: Sidecar, tmp_path: Path) -> None:
    put = await ctl(
        sidecar,
        *("pools", "put", "translate", "--lang", "en:de", "--lang", "en:fr"),
        *("--service", "mt", "--label", "zone=a", "--min-health", "0.5"),
        *("--weight", "cpu=1", "--weight", "free_capacity=0"),
    )
    assert put.code == 0, put.err
    fields = dict(line.split(None, 1) for line in put.out.splitlines())
    assert fields["lang_pairs"] == "en:de,en:fr"
    assert fields["min_health"] == "0.5"
    assert fields["weights"].startswith("cpu=1 gpu=0")

    spec = tmp_path / "batch.json"
    spec.write_text(json.dumps({"langPairs": [{"src": "de", "tgt": "en"}], "minHealth": 0.2}))
    from_file = await ctl(sidecar, "pools", "put", "batch", "--from-file", str(spec), "--json")
    assert from_file.code == 0, from_file.err
    assert from_file.json()["pool"]["poolId"] == "batch"
    assert from_file.json()["pool"]["minHealth"] == 0.2

    listed = await ctl(sidecar, "pools", "list")
    header, *rows = listed.out.splitlines()
    assert header.split() == list(ctl_module.fmt.POOL_HEADERS)
    assert sorted(r.split()[0] for r in rows) == ["batch", "translate"]
    assert "default" in next(r for r in rows if r.startswith("batch"))

    got = await ctl(sidecar, "--json", "pools", "get", "translate")
    assert got.json()["pool"]["requiredServices"] == ["mt"]

    spec.write_text("{not json")
    broken = await ctl(sidecar, "pools", "put", "batch", "--from-file", str(spec))
    assert broken.code == 2 and "--from-file" in broken.err
    spec.write_text(json.dumps({"poolId": "other"}))
    mismatch = await ctl(sidecar, "pools", "put", "batch", "--from-file", str(spec))
    assert mismatch.code == 2 and "'other'" in mismatch.err

    refused = await ctl(sidecar, "pools", "put", "bad", "--min-health", "7")
    assert refused.code == 4 and "min_health" in refused.err


async def test_status(sidecar: Sidecar) -> None:
    shown = await ctl(sidecar, "status")
    assert shown.code == 0, shown.err
    fields = dict(line.split(None, 1) for line in shown.out.splitlines())
    assert fields["mode"] == "NORMAL"
    assert fields["ready"] == "true"
    assert set(fields) == {f.name for f in pb.GetStatusResponse.DESCRIPTOR.fields}

    as_json = await ctl(sidecar, "status", "--json")  # the option after the command
    assert as_json.json()["ready"] is True


async def test_watch_prints_events(client: RegistryClient, sidecar: Sidecar) -> None:
    await seed(client, "n1")

    snapshot = await ctl(sidecar, "watch", "--count", "2", "--timeout", "10")
    assert snapshot.code == 0, snapshot.err
    first, end = snapshot.out.splitlines()
    assert first.split()[1:3] == ["SNAPSHOT", "n1"]
    assert end.split()[1] == "SNAPSHOT_END" and "resume_token=" in end

    # --live waits for a change; keep changing n1 until the stream (opened in the thread)
    # has seen one, so the test does not depend on when the stream opened.
    watch = asyncio.create_task(
        ctl(sidecar, "watch", "--live", "--count", "1", "--timeout", "10", "--json")
    )
    for i in range(100):
        if watch.done():
            break
        await client.register_node(make_node("n1", step=str(i)), ttl_ms=60_000)
        await asyncio.sleep(0.1)
    live = await watch
    assert live.code == 0, live.err
    (line,) = live.out.splitlines()
    event = json.loads(line)
    assert event["type"] == "WATCH_EVENT_TYPE_PUT"
    assert event["node"]["nodeId"] == "n1"

    timed_out = await ctl(sidecar, "watch", "--live", "--timeout", "0.3")
    assert (timed_out.code, timed_out.out) == (0, "")


async def test_unreachable_sidecar_exits_6_quickly() -> None:
    target = f"127.0.0.1:{free_port()}"
    for argv in (["status"], ["watch"], ["nodes", "list", "--json"]):
        started = time.monotonic()
        result = await run_ctl("--target", target, *argv)
        assert result.code == ctl_module.EXIT_UNAVAILABLE == 6, (argv, result)
        assert result.err.startswith("registry ctl: UNAVAILABLE: ")
        assert time.monotonic() - started < 3, argv


async def test_registry_cli_dispatches_ctl(sidecar: Sidecar) -> None:
    # In-process through the `registry` entry point (the sidecar needs this loop: a thread).
    code = await asyncio.to_thread(cli.main, ["ctl", "--target", sidecar.address, "status"])
    assert code == 0
    # And as an operator runs it, once: the console script's module, in a process.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "registry", "ctl", "--target", sidecar.address, "nodes", "get", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("registry ctl: NOT_FOUND")
