"""The protobuf edge: domain values survive the trip, bad enum and pair values do not."""

from __future__ import annotations

import dataclasses

import pytest

from registry import convert
from registry.errors import InvalidArgument
from registry.model import (
    Change,
    EventType,
    InstalledService,
    LanguagePair,
    Metrics,
    NodeFilter,
    NodeSpec,
    NodeStatus,
    Pool,
    SelectionWeights,
    Selector,
)
from registry.selection import Breakdown
from registry_client.v1 import registry_pb2 as pb
from tests.unit.factories import delete, make_node, make_pool, put


def test_node_to_pb_carries_every_field() -> None:
    node = make_node(
        "node-7",
        address="10.1.2.3:7000",
        pools=["zeta", "alpha", "mid"],
        lang_pairs=[("fr", "de"), ("en", "de"), ("en", "by")],
        services=[InstalledService("mt", "nmt", "2.1"), InstalledService("asr", "whisper", "3")],
        labels={"zone": "eu-1", "gpu": "a100"},
        capacity=12,
        running_jobs=5,
        status=NodeStatus.DRAINING,
        health=0.8125,
        metrics=Metrics(cpu=0.1, gpu=0.2, mem=0.3, load=0.4, error_rate=0.05, heartbeat_delay=0.6),
        version=4242,
        ttl_ms=4_500,
        registered_at=1_700_000_000_001,
        last_heartbeat_at=1_700_000_123_456,
    )
    msg = convert.node_to_pb(node)

    assert msg.node_id == "node-7"
    assert msg.address == "10.1.2.3:7000"
    assert list(msg.pools) == ["alpha", "mid", "zeta"]
    assert [(p.src, p.tgt) for p in msg.lang_pairs] == [("en", "by"), ("en", "de"), ("fr", "de")]
    assert [(s.name, s.type, s.version) for s in msg.services] == [
        ("asr", "whisper", "3"),
        ("mt", "nmt", "2.1"),
    ]
    assert dict(msg.labels) == {"zone": "eu-1", "gpu": "a100"}
    assert msg.capacity == 12
    assert msg.running_jobs == 5
    assert msg.status == pb.NODE_STATUS_DRAINING
    assert msg.health_score == 0.8125
    assert (msg.metrics.cpu, msg.metrics.gpu, msg.metrics.mem, msg.metrics.load) == (
        0.1,
        0.2,
        0.3,
        0.4,
    )
    assert msg.metrics.error_rate == 0.05
    assert msg.metrics.heartbeat_delay == 0.6
    assert msg.version == 4242
    assert msg.ttl_ms == 4_500
    assert msg.registered_at == 1_700_000_000_001
    assert msg.last_heartbeat_at == 1_700_000_123_456


def test_spec_round_trips_through_the_wire() -> None:
    node = make_node(
        "node-7",
        address="h:1",
        pools=["b", "a"],
        lang_pairs=[("fr", "de"), ("en", "de")],
        services=[InstalledService("mt", "nmt", "2.1"), InstalledService("asr")],
        labels={"zone": "eu-1"},
        capacity=3,
    )
    wire = pb.Node.FromString(convert.node_to_pb(node).SerializeToString())
    spec = convert.spec_from_pb(wire)

    assert spec == NodeSpec(
        node_id="node-7",
        address="h:1",
        pools=("a", "b"),
        lang_pairs=(LanguagePair("en", "de"), LanguagePair("fr", "de")),
        services=(InstalledService("asr"), InstalledService("mt", "nmt", "2.1")),
        labels={"zone": "eu-1"},
        capacity=3,
        metrics=node.metrics,  # a Node on the wire always carries its figures
    )
    assert spec.to_json() == node.spec_json
    assert isinstance(spec.labels, dict)
    assert convert.metrics_from_pb(wire.metrics) == node.metrics


@pytest.mark.parametrize("status", list(NodeStatus))
def test_status_round_trip(status: NodeStatus) -> None:
    number = convert.status_to_pb(status)
    assert number != pb.NODE_STATUS_UNSPECIFIED
    assert convert.status_from_pb("status", number) is status
    assert convert.node_to_pb(make_node(status=status)).status == number


def test_status_numbers_match_the_contract() -> None:
    assert convert.status_to_pb(NodeStatus.ONLINE) == pb.NODE_STATUS_ONLINE == 1
    assert convert.status_to_pb(NodeStatus.DRAINING) == pb.NODE_STATUS_DRAINING == 2
    assert convert.status_to_pb(NodeStatus.OFFLINE) == pb.NODE_STATUS_OFFLINE == 3
    assert convert.status_to_pb(None) == pb.NODE_STATUS_UNSPECIFIED
    assert convert.status_from_pb("status", pb.NODE_STATUS_UNSPECIFIED) is None


@pytest.mark.parametrize("number", [4, 99, -1])
def test_unknown_status_number_names_the_field(number: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.status_from_pb("status", number)
    assert info.value.field == "status"
    assert str(number) in str(info.value)


def test_filter_with_unknown_status_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.filter_from_pb(pb.ListNodesRequest(status=7))  # type: ignore[arg-type]
    assert info.value.field == "status"


def test_filter_from_pb() -> None:
    msg = pb.ListNodesRequest(
        pool_id="p1",
        lang_pair=pb.LanguagePair(src="en", tgt="de"),
        status=pb.NODE_STATUS_ONLINE,
        labels={"zone": "a"},
    )
    assert convert.filter_from_pb(msg) == NodeFilter(
        pool_id="p1",
        lang_pair=LanguagePair("en", "de"),
        status=NodeStatus.ONLINE,
        labels={"zone": "a"},
    )
    assert convert.filter_from_pb(pb.ListNodesRequest()) == NodeFilter()


def test_lang_pair_from_pb() -> None:
    pair = pb.LanguagePair(src="en", tgt="de")
    assert convert.lang_pair_from_pb("lang_pair", pair, True) == LanguagePair("en", "de")
    assert convert.lang_pair_from_pb("lang_pair", pair, False) is None
    assert convert.lang_pair_from_pb("lang_pair", pb.LanguagePair(), True) is None


@pytest.mark.parametrize(
    "pair", [pb.LanguagePair(src="en"), pb.LanguagePair(tgt="de")], ids=["no-tgt", "no-src"]
)
def test_half_a_lang_pair_is_rejected(pair: pb.LanguagePair) -> None:
    with pytest.raises(InvalidArgument) as info:
        convert.lang_pair_from_pb("lang_pair", pair, True)
    assert info.value.field == "lang_pair"
    with pytest.raises(InvalidArgument) as info:
        convert.selector_from_pb(pb.SelectNodesRequest(lang_pair=pair))
    assert info.value.field == "lang_pair"
    with pytest.raises(InvalidArgument):
        convert.filter_from_pb(pb.ListNodesRequest(lang_pair=pair))


def test_empty_but_present_lang_pair_means_any() -> None:
    msg = pb.SelectNodesRequest(lang_pair=pb.LanguagePair())
    assert msg.HasField("lang_pair")
    assert convert.selector_from_pb(msg).lang_pair is None


def test_selector_from_pb() -> None:
    msg = pb.SelectNodesRequest(
        pool_id="p1",
        lang_pair=pb.LanguagePair(src="en", tgt="de"),
        required_services=["mt", "asr"],
        labels={"zone": "a"},
        count=4,
        exclude_node_ids=["n1", "n2", "n1"],
        min_health=0.25,
    )
    assert convert.selector_from_pb(msg) == Selector(
        pool_id="p1",
        lang_pair=LanguagePair("en", "de"),
        required_services=("mt", "asr"),
        labels={"zone": "a"},
        count=4,
        exclude_node_ids=frozenset({"n1", "n2"}),
        min_health=0.25,
    )


def test_selector_count_zero_means_one() -> None:
    assert convert.selector_from_pb(pb.SelectNodesRequest()).count == 1
    assert convert.selector_from_pb(pb.SelectNodesRequest()) == Selector()


def test_breakdown_to_pb_maps_each_field() -> None:
    names = [
        "considered",
        "wrong_pool",
        "wrong_lang_pair",
        "excluded_id",
        "offline",
        "draining",
        "missing_service",
        "labels",
        "low_health",
        "full",
        "eligible",
    ]
    b = Breakdown(**{name: i + 1 for i, name in enumerate(names)})
    msg = convert.breakdown_to_pb(b)
    assert {name: getattr(msg, name) for name in names} == {
        name: i + 1 for i, name in enumerate(names)
    }


def test_change_to_pb_put() -> None:
    node = make_node("n1", version=17)
    event = convert.change_to_pb(put(node), "tok-17")
    assert event.type == pb.WATCH_EVENT_TYPE_PUT
    assert event.node_id == "n1"
    assert event.version == 17
    assert event.resume_token == "tok-17"
    assert event.HasField("node")
    assert event.node == convert.node_to_pb(node)


def test_change_to_pb_delete() -> None:
    event = convert.change_to_pb(delete("n1", 18), "tok-18")
    assert event.type == pb.WATCH_EVENT_TYPE_DELETE
    assert event.node_id == "n1"
    assert event.version == 18
    assert event.resume_token == "tok-18"
    assert not event.HasField("node")


def test_change_to_pb_delete_ignores_a_stray_node() -> None:
    node = make_node("n1", version=3)
    event = convert.change_to_pb(Change(4, EventType.DELETE, "n1", node), "t")
    assert event.type == pb.WATCH_EVENT_TYPE_DELETE
    assert not event.HasField("node")


def test_metrics_from_pb_ignores_a_reported_heartbeat_delay() -> None:
    msg = pb.NodeMetrics(cpu=0.1, gpu=0.2, mem=0.3, load=0.4, error_rate=0.5, heartbeat_delay=0.9)
    # The delay is the registry's own measurement, never the node's word.
    assert convert.metrics_from_pb(msg) == Metrics(
        cpu=0.1, gpu=0.2, mem=0.3, load=0.4, error_rate=0.5, heartbeat_delay=0.0
    )


# --- pools -------------------------------------------------------------------------------

WEIGHTS = SelectionWeights(
    cpu=1.0, gpu=2.0, mem=3.0, load=4.0, heartbeat_delay=5.0, error_rate=6.0, free_capacity=0.5
)


def full_pool(weights: SelectionWeights | None) -> Pool:
    return make_pool(
        "pool-7",
        lang_pairs=[("fr", "de"), ("en", "de")],
        required_services=["asr", "mt"],
        labels={"zone": "eu-1"},
        min_health=0.25,
        weights=weights,
        version=31,
    )


@pytest.mark.parametrize(
    "weights", [None, WEIGHTS, SelectionWeights()], ids=["unset", "set", "defaults"]
)
def test_pool_round_trips_through_the_wire(weights: SelectionWeights | None) -> None:
    pool = full_pool(weights)
    msg = convert.pool_to_pb(pool)
    wire = pb.Pool.FromString(msg.SerializeToString())
    assert wire.pool_id == "pool-7"
    assert [(p.src, p.tgt) for p in wire.lang_pairs] == [("en", "de"), ("fr", "de")]
    assert list(wire.required_services) == ["asr", "mt"]
    assert dict(wire.labels) == {"zone": "eu-1"}
    assert wire.min_health == 0.25
    assert wire.version == 31
    assert wire.HasField("weights") is (weights is not None)
    back = convert.pool_from_pb(wire)
    # version is output only: a request's version is never trusted.
    assert back == dataclasses.replace(pool, version=0)
    assert back.weights == weights
    assert back.to_json() == pool.to_json()


def test_pool_weights_unset_is_none_and_set_to_zero_is_zero() -> None:
    assert convert.pool_from_pb(pb.Pool(pool_id="p")).weights is None
    zero = convert.pool_from_pb(pb.Pool(pool_id="p", weights=pb.SelectionWeights()))
    assert zero.weights == SelectionWeights(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_weights_from_pb_maps_each_field() -> None:
    msg = pb.SelectionWeights(
        cpu=1.0, gpu=2.0, mem=3.0, load=4.0, heartbeat_delay=5.0, error_rate=6.0, free_capacity=0.5
    )
    assert convert.weights_from_pb(msg) == WEIGHTS


def test_pool_from_pb_defaults() -> None:
    assert convert.pool_from_pb(pb.Pool(pool_id="p")) == Pool("p")
    assert convert.pool_to_pb(Pool("p")) == pb.Pool(pool_id="p")


# --- Pool JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, WEIGHTS], ids=["unset", "set"])
def test_pool_json_round_trip(weights: SelectionWeights | None) -> None:
    pool = full_pool(weights)
    back = Pool.from_json("pool-7", pool.to_json(), 31)
    assert back == dataclasses.replace(pool, required_services=("asr", "mt"))
    assert back.to_json() == pool.to_json()
    assert Pool.from_json("pool-7", pool.to_json(), 99).version == 99


def test_pool_json_is_canonical() -> None:
    a = make_pool(
        lang_pairs=[("fr", "de"), ("en", "de")],
        required_services=["mt", "asr", "mt"],
        labels={"b": "2", "a": "1"},
        version=1,
    )
    b = make_pool(
        lang_pairs=[("en", "de"), ("fr", "de")],
        required_services=["asr", "mt"],
        labels={"a": "1", "b": "2"},
        version=7,
    )
    assert a.to_json() == b.to_json(), "order, duplicates and version do not matter"
    assert "version" not in a.to_json()
    assert " " not in a.to_json(), "compact"
    assert make_pool(min_health=0.5).to_json() != make_pool().to_json()
    assert make_pool(weights=SelectionWeights()).to_json() != make_pool().to_json()


def test_pool_from_json_tolerates_missing_fields() -> None:
    assert Pool.from_json("p", "{}", 3) == Pool("p", version=3)
