"""The degradation parts without Redis: buffer, journal, commands, failure detector."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from registry.degradation import (
    BufferFull,
    Deregister,
    Detector,
    Drain,
    Journal,
    JournalLocked,
    PutPool,
    Register,
    ReleaseSlot,
    ReserveLocal,
    Thresholds,
    WriteBuffer,
)
from registry.degradation.commands import Command, command_from_record
from registry.degradation.detector import RoundTrips
from registry.errors import Unavailable
from registry.model import (
    HeartbeatIn,
    InstalledService,
    LanguagePair,
    Metrics,
    NodeSpec,
    Pool,
)

SPEC = NodeSpec(
    node_id="n1",
    address="10.0.0.1:9000",
    pools=("p",),
    lang_pairs=(LanguagePair("en", "de"),),
    services=(InstalledService("mt", "gpu", "2"),),
    labels={"zone": "a"},
    capacity=3,
)
COMMANDS: list[Command[object]] = [
    Register(SPEC, 9_000, 10_000),
    Deregister("n1"),
    Drain("n2"),
    ReleaseSlot("n1", "j1"),
    ReserveLocal("n1", "j2", 5_000),
    PutPool(Pool(pool_id="p", lang_pairs=(LanguagePair("en", "fr"),), min_health=0.5)),
]


def test_writes_past_the_bound_are_refused_not_dropped() -> None:
    buffer = WriteBuffer(max_ops=2, max_heartbeats=10)
    buffer.add(Drain("a"))
    buffer.add(ReleaseSlot("a", "j1"))
    with pytest.raises(BufferFull) as err:
        buffer.add(Drain("b"))
    assert isinstance(err.value, Unavailable), "refused as UNAVAILABLE: retryable"
    assert [c for _, c in buffer.ops] == [Drain("a"), ReleaseSlot("a", "j1")]
    assert buffer.refused == 1
    assert buffer.pending(("job:j1",)) and buffer.pending(("node:a",))
    assert not buffer.pending(("node:b",))


def test_heartbeats_coalesce_to_the_latest_per_node() -> None:
    buffer = WriteBuffer(max_ops=1, max_heartbeats=2)
    for cpu in (0.1, 0.2, 0.3):
        buffer.add_heartbeat(HeartbeatIn("a", Metrics(cpu=cpu)))
    buffer.add_heartbeat(HeartbeatIn("b", Metrics()))
    assert buffer.heartbeats["a"][1].metrics.cpu == 0.3 and len(buffer.heartbeats) == 2
    # A node already buffered may always update; a new one past the bound is refused.
    buffer.add_heartbeat(HeartbeatIn("b", Metrics(cpu=0.5)))
    with pytest.raises(BufferFull):
        buffer.add_heartbeat(HeartbeatIn("c", Metrics()))
    assert set(buffer.heartbeats) == {"a", "b"} and buffer.refused == 1


def test_a_newer_heartbeat_supersedes_the_buffered_one() -> None:
    buffer = WriteBuffer(max_ops=1, max_heartbeats=2)
    buffer.add_heartbeat(HeartbeatIn("a", Metrics(cpu=0.1)))
    seq = buffer.heartbeats["a"][0]
    buffer.supersede("a")
    assert not buffer.heartbeats and buffer.superseded == 1
    buffer.pop_heartbeat("a", seq)  # a replay that finishes afterwards changes nothing
    assert not buffer.heartbeats


def test_commands_leave_in_order_and_free_their_keys() -> None:
    buffer = WriteBuffer(max_ops=10, max_heartbeats=10)
    for command in COMMANDS:
        buffer.add(command)
    seen = []
    while buffer.ops:
        seq, command = buffer.ops[0]
        seen.append(command)
        buffer.pop_op(seq)
    assert seen == COMMANDS
    assert not buffer.pending(("node:n1", "node:n2", "job:j1", "job:j2", "pool:p"))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.kind)
def test_every_command_survives_its_record(command: Command[object]) -> None:
    again = command_from_record(command.kind, command.to_record())
    assert again == command or (
        isinstance(command, PutPool) and again.to_record() == command.to_record()
    )


def test_the_journal_brings_back_what_was_not_replayed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    buffer = WriteBuffer(10, 10, journal)
    for command in COMMANDS:
        buffer.add(command)
    buffer.add_heartbeat(HeartbeatIn("a", Metrics(cpu=0.1), ("j1",)))
    buffer.add_heartbeat(HeartbeatIn("a", Metrics(cpu=0.2)))
    buffer.add_heartbeat(HeartbeatIn("b", Metrics(cpu=0.3)))
    buffer.pop_op(buffer.ops[0][0])  # the Register reached Redis
    buffer.pop_heartbeat("b", buffer.heartbeats["b"][0])
    journal.close()
    # A crash mid-write leaves a torn line: that write was never acknowledged.
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 99, "kind": "dra')

    again = WriteBuffer(10, 10, Journal(tmp_path / "journal.jsonl"))
    assert again.load() == len(COMMANDS) - 1 + 1
    assert [c for _, c in again.ops][:-1] == COMMANDS[1:-1]
    assert again.ops[-1][1].to_record() == COMMANDS[-1].to_record()
    assert set(again.heartbeats) == {"a"}
    assert again.heartbeats["a"][1] == HeartbeatIn("a", Metrics(cpu=0.2))
    # New entries continue the sequence; draining everything empties the file.
    again.add(Drain("z"))
    assert again.ops[-1][0] > max(seq for seq, _ in list(again.ops)[:-1])
    while again.ops:
        again.pop_op(again.ops[0][0])
    again.pop_heartbeat("a", again.heartbeats["a"][0])
    assert (tmp_path / "journal.jsonl").stat().st_size == 0


def test_a_second_sidecar_cannot_take_the_same_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path / "j.jsonl")
    with pytest.raises(JournalLocked):
        Journal(tmp_path / "j.jsonl")
    first.close()
    Journal(tmp_path / "j.jsonl").close()


def test_the_threshold_follows_the_round_trips_between_floor_and_ceiling() -> None:
    trips = RoundTrips(Thresholds(floor_s=0.03, ceiling_s=0.5, window=100))
    for _ in range(100):
        trips.add(0.0002)  # a quiet machine: the floor decides
    assert trips.threshold_s == pytest.approx(0.03)
    for i in range(100):
        trips.add(0.005 + 0.03 * (i % 5 == 0))  # busy: answers spread out
    assert 0.05 < trips.threshold_s < 0.5
    for _ in range(100):
        trips.add(2.0)
    assert trips.threshold_s == pytest.approx(0.5)


def test_cpu_pressure_on_the_host_raises_the_floor() -> None:
    trips = RoundTrips(Thresholds(floor_s=0.04, ceiling_s=1.0))
    trips.add(0.0002)
    assert trips.threshold_s == pytest.approx(0.04)
    trips.pressure = 0.5  # half the time some task waited for a CPU
    assert trips.threshold_s == pytest.approx(0.08)
    trips.pressure = 1.0
    assert trips.threshold_s == pytest.approx(0.12)


class FakeProbe:
    """A Redis that answers after ``delay`` (None: never), or refuses connections."""

    def __init__(self, delay: float | None = 0.0, refuse: bool = False) -> None:
        self.delay = delay
        self.refuse = refuse
        self._sent = 0.0

    def send(self) -> None:
        if self.refuse:
            raise ConnectionRefusedError("refused")
        self._sent = time.monotonic()

    def ready(self, timeout: float) -> bool:
        if self.delay is not None and time.monotonic() - self._sent >= self.delay:
            return True
        time.sleep(timeout)
        return False

    def read(self) -> None:
        pass

    def reset(self) -> None:
        pass


def run_detector(probe: FakeProbe, heard: float | None, seconds: float) -> list[str]:
    """Trips seen in ``seconds``; ``heard``: other connections answered this long ago
    (None: they answer all the time)."""
    downs: list[str] = []
    started = time.monotonic()
    detector = Detector(
        lambda: probe,
        interval_s=0.005,
        thresholds=Thresholds(floor_s=0.03, ceiling_s=1.0),
        on_down=downs.append,
        heard=lambda: time.monotonic() if heard is None else started - heard,
        pressure=lambda: 0.0,
    )
    detector.start()
    try:
        threading.Event().wait(seconds)
    finally:
        detector.stop()
    return downs


def test_a_frozen_redis_is_down_within_the_floor() -> None:
    probe = FakeProbe(delay=0.0)
    downs: list[str] = []
    detector = Detector(
        lambda: probe,
        interval_s=0.005,
        thresholds=Thresholds(floor_s=0.03, ceiling_s=1.0),
        on_down=downs.append,
        heard=lambda: 0.0,
        pressure=lambda: 0.0,
    )
    detector.start()
    try:
        time.sleep(0.1)
        assert not downs
        probe.delay = None  # SIGSTOP
        frozen = time.monotonic()
        while not downs and time.monotonic() - frozen < 1:
            time.sleep(0.001)
        took = time.monotonic() - frozen
    finally:
        detector.stop()
    assert downs and "silent" in downs[0]
    assert took < 0.03 + 0.02, f"{took * 1000:.0f} ms"


def test_a_slow_redis_that_answers_elsewhere_is_busy_not_down() -> None:
    assert run_detector(FakeProbe(delay=0.08), heard=None, seconds=0.5) == []


def test_a_slow_redis_alone_is_learned_not_tripped_twice() -> None:
    downs = run_detector(FakeProbe(delay=0.05), heard=10.0, seconds=1.0)
    assert len(downs) <= 1, downs  # the first slow answer is new; then it is the norm


def test_a_refused_connection_is_down_at_once() -> None:
    downs = run_detector(FakeProbe(refuse=True), heard=None, seconds=0.05)
    assert len(downs) == 1 and "connection failed" in downs[0]


def test_a_node_with_a_buffered_write_is_pending() -> None:
    buffer = WriteBuffer(max_ops=10, max_heartbeats=10)
    assert not buffer.pending_node("n1")
    buffer.add(Register(SPEC, 9_000))
    assert buffer.pending_node("n1") and not buffer.pending_node("n2")
    buffer.pop_op(buffer.ops[0][0])
    assert not buffer.pending_node("n1")
