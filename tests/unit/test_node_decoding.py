"""Decoding node hashes and change-log entries as redis-py returns them (no Redis here)."""

from __future__ import annotations

import pytest

from registry.gateway import LatencyWindow, change_from_entry, node_from_fields
from registry.model import (
    EventType,
    InstalledService,
    LanguagePair,
    Metrics,
    Node,
    NodeStatus,
)
from tests.unit.factories import make_node


def sample_node() -> Node:
    return make_node(
        "node-1",
        address="10.0.0.1:7000",
        pools=["p2", "p1"],
        lang_pairs=[("en", "de"), ("fr", "de")],
        services=[InstalledService("mt", "nmt", "1.0"), InstalledService("asr", "w", "2")],
        labels={"zone": "eu", "gpu": "a100"},
        capacity=8,
        running_jobs=3,
        status=NodeStatus.DRAINING,
        health=0.75,
        metrics=Metrics(cpu=0.5, gpu=0.25, mem=0.125, load=0.0625, error_rate=0.01),
        version=42,
        ttl_ms=3_000,
        registered_at=1_700_000_000_000,
        last_heartbeat_at=1_700_000_001_234,
    )


def fields_of(node: Node) -> dict[str, str]:
    """The node hash the scripts write, every value a string."""
    m = node.metrics
    return {
        "spec": node.spec_json,
        "capacity": str(node.capacity),
        "status": node.status.value,
        "cpu": str(m.cpu),
        "gpu": str(m.gpu),
        "mem": str(m.mem),
        "load": str(m.load),
        "err": str(m.error_rate),
        "jobs": str(node.running_jobs),
        "health": str(node.health_score),
        "ver": str(node.version),
        "reg_at": str(node.registered_at),
        "hb_at": str(node.last_heartbeat_at),
        "ttl": str(node.ttl_ms),
    }


def as_redis(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


# --- node_from_fields --------------------------------------------------------------------


def test_decodes_every_field() -> None:
    node = sample_node()
    decoded = node_from_fields("node-1", fields_of(node))
    assert decoded == node
    assert decoded.spec_json == node.spec_json
    assert decoded.service_names == frozenset({"mt", "asr"})
    assert decoded.pools == frozenset({"p1", "p2"})
    assert decoded.lang_pairs == frozenset({LanguagePair("en", "de"), LanguagePair("fr", "de")})
    assert decoded.services == (
        InstalledService("asr", "w", "2"),
        InstalledService("mt", "nmt", "1.0"),
    )
    assert decoded.labels == {"zone": "eu", "gpu": "a100"}
    assert decoded.free_slots == 5


def test_lua_number_formats_are_accepted() -> None:
    fields = fields_of(sample_node())
    # Lua's tostring gives floats for numbers that went through arithmetic.
    fields.update({"reg_at": "1.7e+12", "hb_at": "1700000001234.0", "health": "1"})
    decoded = node_from_fields("node-1", fields)
    assert decoded.registered_at == 1_700_000_000_000
    assert decoded.last_heartbeat_at == 1_700_000_001_234
    assert decoded.health_score == 1.0


def test_missing_fields_take_defaults() -> None:
    decoded = node_from_fields("bare", {})
    assert decoded == Node(
        node_id="bare",
        address="",
        pools=frozenset(),
        lang_pairs=frozenset(),
        services=(),
        labels={},
        capacity=0,
        status=NodeStatus.ONLINE,
        metrics=Metrics(),
        running_jobs=0,
        health_score=1.0,
        version=0,
        registered_at=0,
        last_heartbeat_at=0,
        ttl_ms=0,
    )
    assert decoded.spec_json == "{}"
    assert decoded.service_names == frozenset()


@pytest.mark.parametrize("status", list(NodeStatus))
def test_each_status_decodes(status: NodeStatus) -> None:
    fields = fields_of(sample_node())
    fields["status"] = status.value
    assert node_from_fields("node-1", fields).status is status


def test_same_spec_reuses_the_previous_parse() -> None:
    previous = node_from_fields("node-1", fields_of(sample_node()))
    fields = fields_of(sample_node())
    fields.update({"jobs": "7", "ver": "43", "cpu": "0.9"})
    decoded = node_from_fields("node-1", fields, previous)

    assert decoded.running_jobs == 7
    assert decoded.version == 43
    assert decoded.metrics.cpu == 0.9
    assert decoded.pools is previous.pools
    assert decoded.lang_pairs is previous.lang_pairs
    assert decoded.services is previous.services
    assert decoded.labels is previous.labels
    assert decoded.service_names is previous.service_names
    assert decoded.address == previous.address


def test_changed_spec_is_parsed_again() -> None:
    previous = node_from_fields("node-1", fields_of(sample_node()))
    moved = make_node(
        "node-1",
        address="10.0.0.2:7000",
        pools=["p3"],
        lang_pairs=[("de", "en")],
        services=["tts"],
        labels={"zone": "us"},
        version=44,
    )
    decoded = node_from_fields("node-1", fields_of(moved), previous)
    assert decoded == moved
    assert decoded.pools == frozenset({"p3"})
    assert decoded.lang_pairs == frozenset({LanguagePair("de", "en")})
    assert decoded.service_names == frozenset({"tts"})
    assert decoded.labels == {"zone": "us"}
    assert decoded.address == "10.0.0.2:7000"
    assert decoded.spec_json == moved.spec_json


def test_decoded_spec_round_trips_to_the_same_json() -> None:
    decoded = node_from_fields("node-1", fields_of(sample_node()))
    assert (
        make_node(
            "node-1",
            address=decoded.address,
            pools=decoded.pools,
            lang_pairs=decoded.lang_pairs,
            services=decoded.services,
            labels=decoded.labels,
        ).spec_json
        == decoded.spec_json
    )


# --- change_from_entry -------------------------------------------------------------------


def test_put_entry_with_bytes_as_redis_returns_it() -> None:
    node = sample_node()
    raw = as_redis({"op": "put", "id": "node-1", **fields_of(node)})
    change = change_from_entry(b"42-0", raw, None)
    assert change.version == 42
    assert change.type is EventType.PUT
    assert change.node_id == "node-1"
    assert change.node == node
    assert change.node is not None
    assert change.node.spec_json == node.spec_json


def test_put_is_the_default_op_and_str_ids_work() -> None:
    node = sample_node()
    change = change_from_entry("42-0", {"id": "node-1", **fields_of(node)}, None)
    assert change.type is EventType.PUT
    assert change.node == node


def test_put_entry_reuses_the_previous_spec() -> None:
    previous = sample_node()
    raw = as_redis({"op": "put", "id": "node-1", **fields_of(previous), "ver": "50"})
    change = change_from_entry(b"50-0", raw, previous)
    assert change.node is not None
    assert change.node.version == 50
    assert change.node.pools is previous.pools
    assert change.node.labels is previous.labels


def test_delete_entry() -> None:
    change = change_from_entry(b"77-3", {b"op": b"del", b"id": b"node-9"}, sample_node())
    assert change.version == 77
    assert change.type is EventType.DELETE
    assert change.node_id == "node-9"
    assert change.node is None


def test_entry_version_is_the_id_before_the_dash() -> None:
    change = change_from_entry(b"1234567890123-18", {b"op": b"del", b"id": b"x"}, None)
    assert change.version == 1_234_567_890_123


# --- LatencyWindow -----------------------------------------------------------------------


def test_latency_window_empty_is_zero() -> None:
    assert LatencyWindow().percentile(0.99) == 0.0


def test_latency_window_percentiles() -> None:
    window = LatencyWindow()
    for ms in range(100, 0, -1):
        window.add(ms / 1000)
    assert window.percentile(0.0) == 0.001
    assert window.percentile(0.5) == 0.051
    assert window.percentile(0.99) == 0.1
    assert window.percentile(1.0) == 0.1


def test_latency_window_keeps_only_recent_samples() -> None:
    window = LatencyWindow(size=3)
    for value in (9.0, 9.0, 9.0, 1.0, 2.0, 3.0):
        window.add(value)
    assert window.percentile(1.0) == 3.0
    assert window.percentile(0.0) == 1.0
