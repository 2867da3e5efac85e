"""The write buffer's bound and coalescing (registry/degradation.py)."""

from __future__ import annotations

import pytest

from registry.degradation import BufferFull, WriteBuffer
from registry.errors import Unavailable
from registry.model import HeartbeatIn, Metrics


def test_writes_past_the_bound_are_refused_not_dropped() -> None:
    buffer = WriteBuffer(max_ops=2, max_heartbeats=10)
    buffer.add("drain", "a")
    buffer.add("release", "a", "j1")
    with pytest.raises(BufferFull) as err:
        buffer.add("drain", "b")
    assert isinstance(err.value, Unavailable), "refused as UNAVAILABLE: retryable"
    assert list(buffer.ops) == [("drain", ("a",)), ("release", ("a", "j1"))]
    assert buffer.refused == 1


def test_heartbeats_coalesce_to_the_latest_per_node() -> None:
    buffer = WriteBuffer(max_ops=1, max_heartbeats=2)
    for cpu in (0.1, 0.2, 0.3):
        buffer.add_heartbeat(HeartbeatIn("a", Metrics(cpu=cpu)))
    buffer.add_heartbeat(HeartbeatIn("b", Metrics()))
    assert buffer.heartbeats["a"].metrics.cpu == 0.3 and len(buffer.heartbeats) == 2
    # A node already buffered may always update; a new one past the bound is refused.
    buffer.add_heartbeat(HeartbeatIn("b", Metrics(cpu=0.5)))
    with pytest.raises(BufferFull):
        buffer.add_heartbeat(HeartbeatIn("c", Metrics()))
    assert set(buffer.heartbeats) == {"a", "b"} and buffer.refused == 1
