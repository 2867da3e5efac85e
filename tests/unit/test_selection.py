"""Selection: every node counted once under its first failing filter, a pool's
requirements merged into the request, then a weighted random order."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from registry.errors import NotFound
from registry.model import (
    DEFAULT_WEIGHTS,
    Breakdown,
    LanguagePair,
    Metrics,
    Node,
    NodeFilter,
    NodeStatus,
    Pool,
    SelectionWeights,
    Selector,
)
from registry.selection import draw, list_nodes, requirements, select
from tests.unit.factories import delete, make_node, make_pool, put, replica_of

EN_DE = LanguagePair("en", "de")
FR_DE = LanguagePair("fr", "de")
DE_EN = LanguagePair("de", "en")
REASONS = (
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
)
ONLY_CPU = SelectionWeights(
    cpu=1.0, gpu=0.0, mem=0.0, load=0.0, heartbeat_delay=0.0, error_rate=0.0
)


def counts(b: Breakdown) -> dict[str, int]:
    return {name: getattr(b, name) for name in REASONS}


def total(b: Breakdown) -> int:
    return sum(counts(b).values())


def ids(nodes: list[Node]) -> list[str]:
    return [n.node_id for n in nodes]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def first_picks(replica: Any, sel: Selector, draws: int, seed: int, **kwargs: Any) -> Counter[str]:
    generator = rng(seed)
    picks: Counter[str] = Counter()
    for _ in range(draws):
        (node,) = select(replica, dataclasses.replace(sel, count=1), generator, **kwargs).nodes
        picks[node.node_id] += 1
    return picks


# --- the breakdown -----------------------------------------------------------------------


def test_each_node_is_counted_once_under_its_first_failing_filter() -> None:
    zone_a = {"zone": "a"}
    nodes = [
        # Wrong pool and wrong pair: counted under the pool only.
        make_node("a", pools=["p2"], lang_pairs=[("fr", "de")], labels=zone_a),
        make_node("b", lang_pairs=[("fr", "de")], labels=zone_a),
        # Excluded and offline: excluded wins.
        make_node("c", status=NodeStatus.OFFLINE, labels=zone_a),
        make_node("d", status=NodeStatus.OFFLINE, services=["asr"], labels=zone_a),
        make_node("e", status=NodeStatus.DRAINING, health=0.1, labels=zone_a),
        make_node("f", services=["asr"], labels={"zone": "b"}),
        make_node("g", labels={"zone": "b"}, health=0.1),
        make_node("h", labels=zone_a, health=0.1, capacity=2, running_jobs=2),
        make_node("i", labels=zone_a, capacity=2, running_jobs=2),
        make_node("j", labels=zone_a, capacity=0),
        make_node("k", labels=zone_a),
        make_node("l", labels={"zone": "a", "gpu": "yes"}),
    ]
    replica = replica_of(*nodes)
    sel = Selector(
        pool_id="p1",
        lang_pair=EN_DE,
        required_services=("mt",),
        labels=zone_a,
        count=10,
        exclude_node_ids=frozenset({"c"}),
        min_health=0.5,
    )

    result = select(replica, sel, rng(1))

    assert counts(result.breakdown) == {
        "wrong_pool": 1,
        "wrong_lang_pair": 1,
        "excluded_id": 1,
        "offline": 1,
        "draining": 1,
        "missing_service": 1,
        "labels": 1,
        "low_health": 1,
        "full": 2,
        "eligible": 2,
    }
    assert result.breakdown.considered == 12
    assert sorted(ids(result.nodes)) == ["k", "l"]


@pytest.mark.parametrize(
    ("node_kwargs", "selector_kwargs", "reason"),
    [
        ({"pools": ["p2"]}, {"pool_id": "p1"}, "wrong_pool"),
        ({"pools": []}, {"pool_id": "p1"}, "wrong_pool"),
        ({"pools": []}, {"pool_id": "p1"}, "wrong_pool"),
        ({"lang_pairs": [("fr", "de")]}, {"lang_pair": EN_DE}, "wrong_lang_pair"),
        ({"lang_pairs": [("de", "en")]}, {"lang_pair": EN_DE}, "wrong_lang_pair"),
        ({}, {"exclude_node_ids": frozenset({"n1"})}, "excluded_id"),
        ({"status": NodeStatus.OFFLINE}, {}, "offline"),
        ({"status": NodeStatus.DRAINING}, {}, "draining"),
        ({"services": ["mt"]}, {"required_services": ("mt", "asr")}, "missing_service"),
        ({"services": []}, {"required_services": ("mt",)}, "missing_service"),
        ({"labels": {}}, {"labels": {"zone": "a"}}, "labels"),
        ({"labels": {"zone": "b"}}, {"labels": {"zone": "a"}}, "labels"),
        ({"labels": {"zone": "a"}}, {"labels": {"zone": "a", "gpu": "1"}}, "labels"),
        ({"health": 0.49}, {"min_health": 0.5}, "low_health"),
        ({"capacity": 3, "running_jobs": 3}, {}, "full"),
        ({"capacity": 3, "running_jobs": 5}, {}, "full"),
        ({"capacity": 0}, {}, "full"),
        ({}, {}, "eligible"),
        ({"health": 0.5}, {"min_health": 0.5}, "eligible"),
        ({"health": 0.0}, {}, "eligible"),
        ({"services": ["mt", "asr"]}, {"required_services": ("asr",)}, "eligible"),
        ({"labels": {"zone": "a", "x": "y"}}, {"labels": {"zone": "a"}}, "eligible"),
        ({"capacity": 3, "running_jobs": 2}, {}, "eligible"),
    ],
)
def test_single_reason(
    node_kwargs: dict[str, Any], selector_kwargs: dict[str, Any], reason: str
) -> None:
    # "p1" is configured, so it is a known pool even when n1 does not declare it.
    replica = replica_of(make_node("n1", **node_kwargs), pools=[make_pool("p1")])
    result = select(replica, Selector(**selector_kwargs), rng())
    expected = dict.fromkeys(REASONS, 0)
    expected[reason] = 1
    assert counts(result.breakdown) == expected
    assert result.breakdown.considered == 1
    assert ids(result.nodes) == (["n1"] if reason == "eligible" else [])


def test_a_node_in_no_pool_is_wrong_for_a_pool() -> None:
    replica = replica_of(make_node("n1", pools=[]), make_node("n2", pools=["p1"]))
    b = select(replica, Selector(pool_id="p1", count=5), rng()).breakdown
    assert (b.considered, b.wrong_pool, b.eligible) == (2, 1, 1)


def test_pool_and_pair_counts_come_from_index_sizes() -> None:
    nodes = [
        make_node("p1-ende", pools=["p1"], lang_pairs=[("en", "de")]),
        make_node("p1-frde", pools=["p1"], lang_pairs=[("fr", "de")]),
        make_node("p1-both", pools=["p1"], lang_pairs=[("en", "de"), ("fr", "de")]),
        make_node("p2-ende", pools=["p2"], lang_pairs=[("en", "de")]),
        make_node("p2-none", pools=["p2"], lang_pairs=[]),
    ]
    replica = replica_of(*nodes)
    generator = rng()

    only_pair = select(replica, Selector(lang_pair=EN_DE, count=10), generator).breakdown
    assert (only_pair.wrong_pool, only_pair.wrong_lang_pair, only_pair.eligible) == (0, 2, 3)

    only_pool = select(replica, Selector(pool_id="p2", count=10), generator).breakdown
    assert (only_pool.wrong_pool, only_pool.wrong_lang_pair, only_pool.eligible) == (3, 0, 2)

    both = select(replica, Selector(pool_id="p1", lang_pair=FR_DE, count=10), generator).breakdown
    assert (both.wrong_pool, both.wrong_lang_pair, both.eligible) == (2, 1, 2)

    for b in (only_pair, only_pool, both):
        assert b.considered == 5
        assert total(b) == 5


def test_unknown_pool_is_not_found() -> None:
    replica = replica_of(make_node("a", pools=["p1"]))
    with pytest.raises(NotFound, match="nope"):
        select(replica, Selector(pool_id="nope", lang_pair=EN_DE), rng())
    with pytest.raises(NotFound):
        select(replica_of(), Selector(pool_id="p1"), rng())


def test_pool_declared_only_by_a_node_is_fine() -> None:
    replica = replica_of(make_node("a", pools=["p1"]), make_node("b", pools=["p2"]))
    assert replica.pools == {}
    result = select(replica, Selector(pool_id="p1", count=5), rng())
    assert ids(result.nodes) == ["a"]
    assert (result.breakdown.wrong_pool, result.breakdown.eligible) == (1, 1)


def test_configured_pool_without_members_counts_everyone_as_wrong_pool() -> None:
    replica = replica_of(
        make_node("a", pools=["p1"]),
        make_node("b", pools=[]),
        pools=[make_pool("empty", min_health=0.5, lang_pairs=[("en", "de")])],
    )
    result = select(replica, Selector(pool_id="empty", lang_pair=FR_DE, count=5), rng())
    assert result.nodes == []
    expected = dict.fromkeys(REASONS, 0)
    expected["wrong_pool"] = 2
    assert counts(result.breakdown) == expected
    assert result.breakdown.considered == 2


def test_empty_replica() -> None:
    result = select(replica_of(), Selector(lang_pair=EN_DE, count=3))
    assert result.nodes == []
    assert result.breakdown == Breakdown()
    configured = replica_of(pools=[make_pool("p1")])
    result = select(configured, Selector(pool_id="p1", lang_pair=EN_DE))
    assert result.nodes == []
    assert result.breakdown == Breakdown()


def test_excluding_an_unknown_id_changes_nothing() -> None:
    replica = replica_of(make_node("a"), make_node("b"))
    result = select(replica, Selector(count=5, exclude_node_ids=frozenset({"zzz"})))
    assert result.breakdown.excluded_id == 0
    assert sorted(ids(result.nodes)) == ["a", "b"]


def test_selection_reads_the_live_index_after_changes() -> None:
    replica = replica_of(make_node("a", version=1), make_node("b", version=2))
    replica.apply(delete("a", 3))
    replica.apply(put(make_node("c", health=0.2, version=4)))
    result = select(replica, Selector(count=5, min_health=0.5), rng())
    assert ids(result.nodes) == ["b"]
    assert (result.breakdown.considered, result.breakdown.low_health) == (2, 1)


# --- pool requirements -------------------------------------------------------------------


def test_requirements_without_a_pool_are_the_request() -> None:
    sel = Selector(lang_pair=EN_DE, required_services=("mt",), labels={"z": "a"}, min_health=0.3)
    req = requirements(sel, None, DEFAULT_WEIGHTS)
    assert req.lang_pairs == {EN_DE}
    assert req.services == {"mt"}
    assert req.labels == (("z", "a"),)
    assert req.min_health == 0.3
    assert req.weights is None
    assert req.free_capacity == 1.0
    assert requirements(Selector(), None, DEFAULT_WEIGHTS).lang_pairs is None
    free0 = SelectionWeights(free_capacity=0.0)
    assert requirements(Selector(), None, free0).free_capacity == 0.0


def test_request_pair_inside_the_pool_pairs_is_kept() -> None:
    pool = make_pool(lang_pairs=[("en", "de"), ("fr", "de")])
    assert requirements(Selector(lang_pair=EN_DE), pool, DEFAULT_WEIGHTS).lang_pairs == {EN_DE}


def test_request_pair_outside_the_pool_pairs_allows_nothing() -> None:
    pool = make_pool(lang_pairs=[("fr", "de")])
    req = requirements(Selector(lang_pair=EN_DE), pool, DEFAULT_WEIGHTS)
    assert req.lang_pairs == frozenset()
    # Through select: every pool member is counted as wrong_lang_pair, even one that serves
    # the requested pair.
    replica = replica_of(
        make_node("a", lang_pairs=[("en", "de")]),
        make_node("b", lang_pairs=[("fr", "de")]),
        make_node("c", lang_pairs=[("en", "de"), ("fr", "de")]),
        make_node("other", pools=["p2"]),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", lang_pair=EN_DE, count=5), rng())
    assert result.nodes == []
    assert (result.breakdown.wrong_pool, result.breakdown.wrong_lang_pair) == (1, 3)
    assert total(result.breakdown) == result.breakdown.considered == 4


def test_no_request_pair_means_any_of_the_pool_pairs() -> None:
    pool = make_pool(lang_pairs=[("en", "de"), ("fr", "de")])
    assert requirements(Selector(), pool, DEFAULT_WEIGHTS).lang_pairs == {EN_DE, FR_DE}
    assert requirements(Selector(), make_pool(), DEFAULT_WEIGHTS).lang_pairs is None
    replica = replica_of(
        make_node("ende", lang_pairs=[("en", "de")]),
        make_node("frde", lang_pairs=[("fr", "de")]),
        make_node("deen", lang_pairs=[("de", "en")]),
        make_node("none", lang_pairs=[]),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", count=5), rng())
    assert sorted(ids(result.nodes)) == ["ende", "frde"]
    assert result.breakdown.wrong_lang_pair == 2
    # A pool with no pairs of its own allows whatever the request asks.
    open_pool = replica_of(make_node("deen", lang_pairs=[("de", "en")]), pools=[make_pool()])
    found = select(open_pool, Selector(pool_id="p1", lang_pair=DE_EN), rng())
    assert ids(found.nodes) == ["deen"]


def test_services_are_the_union() -> None:
    pool = make_pool(required_services=["asr"])
    req = requirements(Selector(required_services=("mt",)), pool, DEFAULT_WEIGHTS)
    assert req.services == {"mt", "asr"}
    replica = replica_of(
        make_node("mt", services=["mt"]),
        make_node("asr", services=["asr"]),
        make_node("both", services=["mt", "asr", "tts"]),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", required_services=("mt",), count=5), rng())
    assert ids(result.nodes) == ["both"]
    assert result.breakdown.missing_service == 2
    only_pool = select(replica, Selector(pool_id="p1", count=5), rng())
    assert sorted(ids(only_pool.nodes)) == ["asr", "both"]


def test_labels_merge_and_the_request_wins_on_a_clash() -> None:
    pool = make_pool(labels={"zone": "a", "tier": "gold"})
    req = requirements(Selector(labels={"zone": "b", "gpu": "1"}), pool, DEFAULT_WEIGHTS)
    assert dict(req.labels) == {"zone": "b", "tier": "gold", "gpu": "1"}
    replica = replica_of(
        make_node("pool-zone", labels={"zone": "a", "tier": "gold", "gpu": "1"}),
        make_node("req-zone", labels={"zone": "b", "tier": "gold", "gpu": "1"}),
        make_node("no-tier", labels={"zone": "b", "gpu": "1"}),
        pools=[pool],
    )
    sel = Selector(pool_id="p1", labels={"zone": "b", "gpu": "1"}, count=5)
    result = select(replica, sel, rng())
    assert ids(result.nodes) == ["req-zone"]
    assert result.breakdown.labels == 2
    # Without request labels, the pool's apply.
    assert ids(select(replica, Selector(pool_id="p1", count=5), rng()).nodes) == ["pool-zone"]


@pytest.mark.parametrize(("request_min", "pool_min", "merged"), [(0.2, 0.6, 0.6), (0.8, 0.6, 0.8)])
def test_min_health_is_the_higher(request_min: float, pool_min: float, merged: float) -> None:
    pool = make_pool(min_health=pool_min)
    assert requirements(Selector(min_health=request_min), pool, DEFAULT_WEIGHTS).min_health == (
        merged
    )
    replica = replica_of(
        make_node("h5", health=0.5),
        make_node("h7", health=0.7),
        make_node("h9", health=0.9),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", min_health=request_min, count=5), rng())
    assert sorted(ids(result.nodes)) == sorted(
        n for n, h in (("h5", 0.5), ("h7", 0.7), ("h9", 0.9)) if h >= merged
    )


def test_pool_weights_equal_to_the_defaults_use_the_stored_health() -> None:
    same_vector = SelectionWeights(free_capacity=0.0)
    pool = make_pool(weights=same_vector, min_health=0.5)
    req = requirements(Selector(), pool, DEFAULT_WEIGHTS)
    assert req.weights is None, "no recomputation: the stored score is the same formula"
    assert req.free_capacity == 0.0, "but the pool's free_capacity still applies"
    # Stored health, not the metrics: an idle node stored at 0.2 is too unhealthy.
    replica = replica_of(
        make_node("stored-low", health=0.2, metrics=Metrics()),
        make_node("stored-high", health=0.9, metrics=Metrics(cpu=1.0, gpu=1.0, mem=1.0)),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", count=5), rng())
    assert ids(result.nodes) == ["stored-high"]
    assert result.breakdown.low_health == 1
    # Equal to the sidecar's defaults, whatever those are.
    custom = make_pool(weights=ONLY_CPU)
    assert requirements(Selector(), custom, ONLY_CPU).weights is None


def test_pool_weights_different_from_the_defaults_recompute_health_from_metrics() -> None:
    pool = make_pool(weights=ONLY_CPU, min_health=0.5)
    req = requirements(Selector(), pool, DEFAULT_WEIGHTS)
    assert req.weights == ONLY_CPU
    replica = replica_of(
        # Stored 1.0 for both; by cpu alone: busy-cpu 0.2, busy-gpu 1.0.
        make_node("busy-cpu", health=1.0, metrics=Metrics(cpu=0.8)),
        make_node("busy-gpu", health=0.1, metrics=Metrics(gpu=1.0, heartbeat_delay=1.0)),
        pools=[pool],
    )
    result = select(replica, Selector(pool_id="p1", count=5), rng())
    assert ids(result.nodes) == ["busy-gpu"]
    assert result.breakdown.low_health == 1
    # Without the pool, the same nodes rank by their stored health.
    plain = select(replica, Selector(count=5, min_health=0.5), rng())
    assert ids(plain.nodes) == ["busy-cpu"]
    # Under other sidecar defaults, the stored-health shortcut does not apply.
    assert requirements(Selector(), make_pool(weights=DEFAULT_WEIGHTS), ONLY_CPU).weights == (
        DEFAULT_WEIGHTS
    )


def test_recomputed_health_includes_heartbeat_delay() -> None:
    only_delay = SelectionWeights(0.0, 0.0, 0.0, 0.0, heartbeat_delay=1.0, error_rate=0.0)
    replica = replica_of(
        make_node("late", metrics=Metrics(heartbeat_delay=0.75)),
        make_node("punctual", metrics=Metrics(cpu=1.0, heartbeat_delay=0.25)),
        pools=[make_pool(weights=only_delay, min_health=0.5)],
    )
    result = select(replica, Selector(pool_id="p1", count=5), rng())
    assert ids(result.nodes) == ["punctual"]


# --- draw --------------------------------------------------------------------------------


def test_draw_edge_cases() -> None:
    empty = draw(np.array([]), np.array([], np.int64), 1.0, 3, rng())
    assert len(empty) == 0
    health = np.array([0.5, 0.0, 1.0, 0.7])
    free = np.array([1, 5, 2, 0], np.int64)
    order = draw(health, free, 1.0, 10, rng())
    assert sorted(order) == [0, 1, 2, 3]
    assert set(order[2:]) == {1, 3}, "zero weight (no health, or no free slot) comes last"
    assert len(draw(health, free, 1.0, 2, rng())) == 2
    assert set(draw(health, free, 1.0, 2, rng())) <= {0, 2}


# --- count and ranking -------------------------------------------------------------------


@pytest.mark.parametrize(("count", "returned"), [(1, 1), (3, 3), (5, 5), (6, 5), (1000, 5)])
def test_count_limits_the_result_not_the_breakdown(count: int, returned: int) -> None:
    replica = replica_of(*(make_node(f"n{i}") for i in range(5)))
    result = select(replica, Selector(count=count), rng(3))
    assert len(result.nodes) == returned
    assert len(set(ids(result.nodes))) == returned, "no node twice in one result"
    assert result.breakdown.eligible == 5


@pytest.mark.parametrize("seed", range(10))
def test_no_duplicates_in_one_result(seed: int) -> None:
    nodes = [make_node(f"n{i}", health=(i % 4) / 4, capacity=1 + i % 3) for i in range(30)]
    result = select(replica_of(*nodes), Selector(count=30), rng(seed))
    assert len(result.nodes) == 30
    assert len(set(ids(result.nodes))) == 30


def test_equal_nodes_share_the_picks() -> None:
    replica = replica_of(*(make_node(f"n{i}") for i in range(4)))
    picks = first_picks(replica, Selector(), 4000, seed=11)
    assert set(picks) == {"n0", "n1", "n2", "n3"}
    # Expected 1000 each; the standard deviation is about 27.
    assert all(880 <= n <= 1120 for n in picks.values()), picks


def test_random_tie_break_spreads_picks_over_many_equal_nodes() -> None:
    replica = replica_of(*(make_node(f"n{i:02}") for i in range(20)))
    picks = first_picks(replica, Selector(), 2000, seed=20240601)
    assert set(picks) == {f"n{i:02}" for i in range(20)}
    # Expected 100 each; the standard deviation is about 10.
    assert all(60 <= n <= 140 for n in picks.values()), picks


def test_twice_the_health_gets_about_twice_the_picks() -> None:
    replica = replica_of(make_node("strong", health=0.8), make_node("weak", health=0.4))
    picks = first_picks(replica, Selector(), 4000, seed=7)
    # Expected 2667 : 1333; the standard deviation is about 30.
    assert 2520 <= picks["strong"] <= 2810, picks
    assert 1.75 <= picks["strong"] / picks["weak"] <= 2.3, picks


def test_twice_the_free_slots_gets_about_twice_the_picks() -> None:
    replica = replica_of(
        make_node("two-free", capacity=10, running_jobs=8),
        make_node("one-free", capacity=10, running_jobs=9),
    )
    picks = first_picks(replica, Selector(), 4000, seed=8)
    assert 2520 <= picks["two-free"] <= 2810, picks
    assert 1.75 <= picks["two-free"] / picks["one-free"] <= 2.3, picks


def test_free_capacity_weight_is_the_exponent() -> None:
    replica = replica_of(
        make_node("two-free", capacity=10, running_jobs=8),
        make_node("one-free", capacity=10, running_jobs=9),
    )
    ignore = first_picks(replica, Selector(), 4000, 9, defaults=SelectionWeights(free_capacity=0))
    # Expected 2000 each; the standard deviation is about 32.
    assert 1850 <= ignore["two-free"] <= 2150, ignore
    squared = first_picks(
        replica, Selector(), 4000, 10, defaults=SelectionWeights(free_capacity=2.0)
    )
    # Expected 3200 : 800.
    assert 3080 <= squared["two-free"] <= 3320, squared


def test_a_pool_free_capacity_weight_overrides_the_defaults() -> None:
    replica = replica_of(
        make_node("two-free", capacity=10, running_jobs=8),
        make_node("one-free", capacity=10, running_jobs=9),
        pools=[make_pool(weights=SelectionWeights(free_capacity=0.0))],
    )
    in_pool = first_picks(replica, Selector(pool_id="p1"), 4000, seed=12)
    assert 1850 <= in_pool["two-free"] <= 2150, in_pool
    outside = first_picks(replica, Selector(), 4000, seed=12)
    assert 2520 <= outside["two-free"] <= 2810, outside


@pytest.mark.parametrize("seed", range(20))
def test_weight_zero_nodes_come_last(seed: int) -> None:
    live = [make_node(f"live{i}", health=0.05 + i / 10) for i in range(5)]
    dead = [make_node(f"dead{i}", health=0.0) for i in range(5)]
    replica = replica_of(*dead, *live)
    result = select(replica, Selector(count=10), rng(seed))
    assert result.breakdown.eligible == 10
    assert all(n.node_id.startswith("live") for n in result.nodes[:5]), ids(result.nodes)
    assert all(n.node_id.startswith("dead") for n in result.nodes[5:]), ids(result.nodes)
    top = select(replica, Selector(count=5), rng(seed)).nodes
    assert all(n.node_id.startswith("live") for n in top)


def test_weight_zero_nodes_are_still_returned_when_nothing_else_is_left() -> None:
    replica = replica_of(make_node("dead", health=0.0), make_node("live", health=0.5))
    assert ids(select(replica, Selector(count=2), rng()).nodes) == ["live", "dead"]
    assert ids(select(replica_of(make_node("dead", health=0.0)), Selector(), rng()).nodes) == [
        "dead"
    ]


def test_same_seed_same_choice_and_default_rng_works() -> None:
    replica = replica_of(*(make_node(f"n{i}") for i in range(10)))
    first = select(replica, Selector(count=3), rng(42)).nodes
    again = select(replica, Selector(count=3), rng(42)).nodes
    assert ids(first) == ids(again)
    assert len(select(replica, Selector(count=3)).nodes) == 3


# --- list_nodes --------------------------------------------------------------------------


def test_list_nodes_filters_and_orders_by_id() -> None:
    replica = replica_of(
        make_node("c", labels={"zone": "a"}),
        make_node("a", labels={"zone": "a", "gpu": "1"}, status=NodeStatus.DRAINING),
        make_node("b", labels={"zone": "b"}, status=NodeStatus.OFFLINE),
        make_node("d", pools=["p2"], lang_pairs=[("fr", "de")], labels={"zone": "a"}),
    )
    assert ids(list_nodes(replica, NodeFilter())) == ["a", "b", "c", "d"]
    assert ids(list_nodes(replica, NodeFilter(pool_id="p1"))) == ["a", "b", "c"]
    assert ids(list_nodes(replica, NodeFilter(pool_id="p9"))) == []
    assert ids(list_nodes(replica, NodeFilter(lang_pair=FR_DE))) == ["d"]
    assert ids(list_nodes(replica, NodeFilter(status=NodeStatus.ONLINE))) == ["c", "d"]
    assert ids(list_nodes(replica, NodeFilter(status=NodeStatus.DRAINING))) == ["a"]
    assert ids(list_nodes(replica, NodeFilter(status=NodeStatus.OFFLINE))) == ["b"]
    assert ids(list_nodes(replica, NodeFilter(labels={"zone": "a"}))) == ["a", "c", "d"]
    assert ids(list_nodes(replica, NodeFilter(labels={"zone": "a", "gpu": "1"}))) == ["a"]
    assert ids(list_nodes(replica, NodeFilter(labels={"zone": ""}))) == []
    combined = NodeFilter(pool_id="p1", status=NodeStatus.ONLINE, labels={"zone": "a"})
    assert ids(list_nodes(replica, combined)) == ["c"]


def test_list_nodes_orders_many_ids() -> None:
    names = [f"node-{i:03}" for i in range(50)]
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    replica = replica_of(*(make_node(n) for n in shuffled))
    assert ids(list_nodes(replica, NodeFilter(pool_id="p1"))) == names


# --- properties --------------------------------------------------------------------------

POOLS = ("p1", "p2", "p3")
PAIRS = (EN_DE, FR_DE, DE_EN)
SERVICES = ("mt", "asr", "tts")
METRIC_NAMES = ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")

_metrics = st.builds(Metrics, **{n: st.sampled_from((0.0, 0.25, 0.5, 1.0)) for n in METRIC_NAMES})
_node_parts = st.fixed_dictionaries(
    {
        "pools": st.sets(st.sampled_from(POOLS)),
        "lang_pairs": st.sets(st.sampled_from(PAIRS)),
        "services": st.sets(st.sampled_from(SERVICES)),
        "labels": st.dictionaries(st.sampled_from(("zone", "gpu")), st.sampled_from("ab")),
        "capacity": st.integers(0, 3),
        "running_jobs": st.integers(0, 4),
        "status": st.sampled_from(NodeStatus),
        "health": st.sampled_from((0.0, 0.3, 0.5, 0.51, 0.9, 1.0)),
        "metrics": _metrics,
    }
)
# Strategies are built once: building them inside a composite costs more than the test.
nodes = st.lists(_node_parts, max_size=25).map(
    lambda parts: [make_node(f"n{i}", **kw) for i, kw in enumerate(parts)]
)
_weights = st.one_of(
    st.none(),
    st.builds(SelectionWeights, free_capacity=st.sampled_from((0.0, 1.0, 2.0))),
    st.builds(
        SelectionWeights,
        **{n: st.sampled_from((0.0, 1.0, 2.0)) for n in METRIC_NAMES},
        free_capacity=st.sampled_from((0.0, 1.0, 2.0)),
    ),
)
_pool = st.builds(
    make_pool,
    lang_pairs=st.sets(st.sampled_from(PAIRS), max_size=2),
    required_services=st.lists(st.sampled_from(SERVICES), max_size=2),
    labels=st.dictionaries(st.sampled_from(("zone", "gpu")), st.sampled_from("ab"), max_size=2),
    min_health=st.sampled_from((0.0, 0.5, 0.7)),
    weights=_weights,
)
# Each pool is configured or not; "p4" may be configured without members.
pool_configs = st.fixed_dictionaries({p: st.none() | _pool for p in (*POOLS, "p4")}).map(
    lambda d: [dataclasses.replace(pool, pool_id=p) for p, pool in d.items() if pool is not None]
)
selectors = st.builds(
    Selector,
    pool_id=st.sampled_from(("", *POOLS, "p4", "p9")),
    lang_pair=st.none() | st.sampled_from(PAIRS),
    required_services=st.lists(st.sampled_from(SERVICES), max_size=2).map(tuple),
    labels=st.dictionaries(st.sampled_from(("zone", "gpu")), st.sampled_from("ab"), max_size=2),
    count=st.integers(1, 30),
    exclude_node_ids=st.frozensets(st.sampled_from([f"n{i}" for i in range(30)]), max_size=5),
    min_health=st.sampled_from((0.0, 0.5, 0.9)),
)
defaults_choices = st.sampled_from((DEFAULT_WEIGHTS, ONLY_CPU))


def effective_health(node: Node, pool: Pool | None, defaults: SelectionWeights) -> float:
    """Stored health, unless the pool weighs the metrics differently from the sidecar."""
    w = pool.weights if pool is not None else None
    if w is None or w.health_vector() == defaults.health_vector():
        return node.health_score
    vector = w.health_vector()
    if sum(vector) <= 0:
        return 1.0
    values = [getattr(node.metrics, n) for n in METRIC_NAMES]
    return min(
        max(1.0 - sum(a * b for a, b in zip(vector, values, strict=True)) / sum(vector), 0), 1
    )


def first_failing(node: Node, sel: Selector, pool: Pool | None, defaults: SelectionWeights) -> str:
    """An independent statement of the documented filter order and pool merge."""
    if sel.pool_id and sel.pool_id not in node.pools:
        return "wrong_pool"
    pool_pairs = pool.lang_pairs if pool is not None else frozenset()
    if sel.lang_pair is not None:
        if (pool_pairs and sel.lang_pair not in pool_pairs) or sel.lang_pair not in node.lang_pairs:
            return "wrong_lang_pair"
    elif pool_pairs and not (pool_pairs & node.lang_pairs):
        return "wrong_lang_pair"
    if node.node_id in sel.exclude_node_ids:
        return "excluded_id"
    if node.status is NodeStatus.OFFLINE:
        return "offline"
    if node.status is NodeStatus.DRAINING:
        return "draining"
    services = set(sel.required_services) | set(pool.required_services if pool else ())
    if not services <= {s.name for s in node.services}:
        return "missing_service"
    labels = {**(pool.labels if pool else {}), **sel.labels}
    if any(node.labels.get(k) != v for k, v in labels.items()):
        return "labels"
    min_health = max(sel.min_health, pool.min_health if pool else 0.0)
    if effective_health(node, pool, defaults) < min_health:
        return "low_health"
    if node.running_jobs >= node.capacity:
        return "full"
    return "eligible"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes, pool_configs, selectors, defaults_choices, st.integers(0, 2**32))
def test_breakdown_matches_the_documented_order(
    population: list[Node],
    configured: list[Pool],
    sel: Selector,
    defaults: SelectionWeights,
    seed: int,
) -> None:
    replica = replica_of(*population, pools=configured)
    pool = replica.pools.get(sel.pool_id)
    declared = any(sel.pool_id in n.pools for n in population)
    if sel.pool_id and pool is None and not declared:
        with pytest.raises(NotFound):
            select(replica, sel, rng(seed), defaults)
        return
    min_health = max(sel.min_health, pool.min_health if pool else 0.0)
    # Recomputed health compared with a threshold: stay clear of float ties.
    assume(all(abs(effective_health(n, pool, defaults) - min_health) > 1e-9 for n in population))

    result = select(replica, sel, rng(seed), defaults)
    b = result.breakdown

    expected = Counter(first_failing(n, sel, pool, defaults) for n in population)
    assert counts(b) == {reason: expected[reason] for reason in REASONS}
    assert b.considered == len(population) == total(b)

    assert len(result.nodes) == min(sel.count, b.eligible)
    assert len({n.node_id for n in result.nodes}) == len(result.nodes)
    for node in result.nodes:
        assert first_failing(node, sel, pool, defaults) == "eligible"
    # Weighted order: a node of weight 0 never precedes one of positive weight, and is
    # taken only once every positive-weight node is.
    free_capacity = ((pool.weights if pool else None) or defaults).free_capacity

    def weight(n: Node) -> float:
        return effective_health(n, pool, defaults) * (n.capacity - n.running_jobs) ** free_capacity

    positive = [weight(n) > 0 for n in result.nodes]
    assert positive == sorted(positive, reverse=True)
    if not all(positive):
        eligible = [n for n in population if first_failing(n, sel, pool, defaults) == "eligible"]
        assert sum(weight(n) > 0 for n in eligible) == sum(positive)


@settings(max_examples=100, deadline=None)
@given(nodes, st.sampled_from(("", *POOLS)), st.none() | st.sampled_from(PAIRS))
def test_list_nodes_matches_a_plain_filter(
    population: list[Node], pool_id: str, pair: LanguagePair | None
) -> None:
    replica = replica_of(*population)
    f = NodeFilter(pool_id=pool_id, lang_pair=pair, labels={"zone": "a"})
    expected = sorted(
        n.node_id
        for n in population
        if (not pool_id or pool_id in n.pools)
        and (pair is None or pair in n.lang_pairs)
        and n.labels.get("zone") == "a"
    )
    assert ids(list_nodes(replica, f)) == expected
    assert ids(list_nodes(replica, dataclasses.replace(f, labels={}))) == sorted(
        n.node_id
        for n in population
        if (not pool_id or pool_id in n.pools) and (pair is None or pair in n.lang_pairs)
    )
