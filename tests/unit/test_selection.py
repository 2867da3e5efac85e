"""Selection: every node counted once under its first failing filter, then ranked."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.model import LanguagePair, Node, NodeFilter, NodeStatus, Selector
from registry.selection import BAND, Breakdown, list_nodes, score, select
from tests.unit.factories import make_node, replica_of

EN_DE = LanguagePair("en", "de")
FR_DE = LanguagePair("fr", "de")
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


def counts(b: Breakdown) -> dict[str, int]:
    return {name: getattr(b, name) for name in REASONS}


def total(b: Breakdown) -> int:
    return sum(counts(b).values())


def ids(nodes: list[Node]) -> list[str]:
    return [n.node_id for n in nodes]


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

    result = select(replica, sel, random.Random(1))

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
        ({"services": ["mt", "asr"]}, {"required_services": ("asr",)}, "eligible"),
        ({"labels": {"zone": "a", "x": "y"}}, {"labels": {"zone": "a"}}, "eligible"),
        ({"capacity": 3, "running_jobs": 2}, {}, "eligible"),
    ],
)
def test_single_reason(
    node_kwargs: dict[str, Any], selector_kwargs: dict[str, Any], reason: str
) -> None:
    replica = replica_of(make_node("n1", **node_kwargs))
    result = select(replica, Selector(**selector_kwargs), random.Random(0))
    expected = dict.fromkeys(REASONS, 0)
    expected[reason] = 1
    assert counts(result.breakdown) == expected
    assert result.breakdown.considered == 1
    assert ids(result.nodes) == (["n1"] if reason == "eligible" else [])


def test_pool_and_pair_counts_come_from_index_sizes() -> None:
    nodes = [
        make_node("p1-ende", pools=["p1"], lang_pairs=[("en", "de")]),
        make_node("p1-frde", pools=["p1"], lang_pairs=[("fr", "de")]),
        make_node("p1-both", pools=["p1"], lang_pairs=[("en", "de"), ("fr", "de")]),
        make_node("p2-ende", pools=["p2"], lang_pairs=[("en", "de")]),
        make_node("p2-none", pools=["p2"], lang_pairs=[]),
    ]
    replica = replica_of(*nodes)
    rng = random.Random(0)

    only_pair = select(replica, Selector(lang_pair=EN_DE, count=10), rng).breakdown
    assert (only_pair.wrong_pool, only_pair.wrong_lang_pair, only_pair.eligible) == (0, 2, 3)

    only_pool = select(replica, Selector(pool_id="p2", count=10), rng).breakdown
    assert (only_pool.wrong_pool, only_pool.wrong_lang_pair, only_pool.eligible) == (3, 0, 2)

    both = select(replica, Selector(pool_id="p1", lang_pair=FR_DE, count=10), rng).breakdown
    assert (both.wrong_pool, both.wrong_lang_pair, both.eligible) == (2, 1, 2)

    unknown = select(replica, Selector(pool_id="nope", lang_pair=EN_DE), rng)
    assert (unknown.breakdown.wrong_pool, unknown.breakdown.wrong_lang_pair) == (5, 0)
    assert unknown.nodes == []

    for b in (only_pair, only_pool, both, unknown.breakdown):
        assert b.considered == 5
        assert total(b) == 5


def test_empty_replica() -> None:
    result = select(replica_of(), Selector(pool_id="p1", lang_pair=EN_DE))
    assert result.nodes == []
    assert result.breakdown == Breakdown()


def test_excluding_an_unknown_id_changes_nothing() -> None:
    replica = replica_of(make_node("a"), make_node("b"))
    result = select(replica, Selector(count=5, exclude_node_ids=frozenset({"zzz"})))
    assert result.breakdown.excluded_id == 0
    assert sorted(ids(result.nodes)) == ["a", "b"]


# --- count and ranking -------------------------------------------------------------------


@pytest.mark.parametrize(("count", "returned"), [(1, 1), (3, 3), (5, 5), (6, 5), (1000, 5)])
def test_count_limits_the_result_not_the_breakdown(count: int, returned: int) -> None:
    replica = replica_of(*(make_node(f"n{i}") for i in range(5)))
    result = select(replica, Selector(count=count), random.Random(3))
    assert len(result.nodes) == returned
    assert len(set(ids(result.nodes))) == returned
    assert result.breakdown.eligible == 5


def test_score_weights_health_and_free_capacity() -> None:
    assert score(make_node(health=1.0, capacity=4, running_jobs=0)) == pytest.approx(1.0)
    assert score(make_node(health=0.5, capacity=4, running_jobs=2)) == pytest.approx(0.5)
    assert score(make_node(health=0.0, capacity=4, running_jobs=4)) == pytest.approx(0.0)
    # No capacity: no free share, and no division by zero.
    assert score(make_node(health=1.0, capacity=0)) == pytest.approx(0.7)


@pytest.mark.parametrize("seed", range(20))
def test_higher_health_ranks_first(seed: int) -> None:
    replica = replica_of(
        make_node("mid", health=0.5, capacity=10),
        make_node("top", health=0.9, capacity=10),
        make_node("low", health=0.2, capacity=10),
    )
    result = select(replica, Selector(count=3), random.Random(seed))
    assert ids(result.nodes) == ["top", "mid", "low"]


@pytest.mark.parametrize("seed", range(20))
def test_more_free_capacity_ranks_first(seed: int) -> None:
    replica = replica_of(
        make_node("half", health=0.8, capacity=10, running_jobs=5),
        make_node("busy", health=0.8, capacity=10, running_jobs=9),
        make_node("idle", health=0.8, capacity=10, running_jobs=0),
    )
    result = select(replica, Selector(count=3), random.Random(seed))
    assert ids(result.nodes) == ["idle", "half", "busy"]


@pytest.mark.parametrize("seed", range(20))
def test_health_outweighs_free_capacity(seed: int) -> None:
    replica = replica_of(
        make_node("healthy-busy", health=1.0, capacity=10, running_jobs=9),  # 0.73
        make_node("sick-idle", health=0.5, capacity=10, running_jobs=0),  # 0.65
    )
    result = select(replica, Selector(count=1), random.Random(seed))
    assert ids(result.nodes) == ["healthy-busy"]


def test_random_tie_break_spreads_picks_over_equal_nodes() -> None:
    replica = replica_of(*(make_node(f"n{i:02}") for i in range(20)))
    rng = random.Random(20240601)
    picks: Counter[str] = Counter()
    for _ in range(2000):
        (node,) = select(replica, Selector(count=1), rng).nodes
        picks[node.node_id] += 1
    assert set(picks) == {f"n{i:02}" for i in range(20)}
    # Expected 100 each; the standard deviation is about 10.
    assert all(60 <= n <= 140 for n in picks.values()), picks


def test_near_equal_scores_share_a_band_and_both_get_picked() -> None:
    a = make_node("a", health=0.90, capacity=10)
    b = make_node("b", health=0.91, capacity=10)
    assert int(score(a) / BAND) == int(score(b) / BAND)
    replica = replica_of(a, b)
    rng = random.Random(5)
    picks = Counter(select(replica, Selector(count=1), rng).nodes[0].node_id for _ in range(1000))
    assert 400 <= picks["a"] <= 600
    assert picks["a"] + picks["b"] == 1000


def test_top_band_is_always_taken_before_lower_bands() -> None:
    top = [make_node(f"top{i}", health=1.0) for i in range(3)]
    rest = [make_node(f"low{i}", health=0.3) for i in range(10)]
    replica = replica_of(*top, *rest)
    rng = random.Random(9)
    for _ in range(200):
        chosen = select(replica, Selector(count=4), rng).nodes
        assert sorted(ids(chosen[:3])) == ["top0", "top1", "top2"]
        assert chosen[3].node_id.startswith("low")


def test_same_seed_same_choice_and_default_rng_works() -> None:
    replica = replica_of(*(make_node(f"n{i}") for i in range(10)))
    first = select(replica, Selector(count=3), random.Random(42)).nodes
    again = select(replica, Selector(count=3), random.Random(42)).nodes
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
PAIRS = (EN_DE, FR_DE, LanguagePair("de", "en"))
SERVICES = ("mt", "asr", "tts")


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
    }
)
# Strategies are built once: building them inside a composite costs more than the test.
nodes = st.lists(_node_parts, max_size=25).map(
    lambda parts: [make_node(f"n{i}", **kw) for i, kw in enumerate(parts)]
)


selectors = st.builds(
    Selector,
    pool_id=st.sampled_from(("", *POOLS, "p9")),
    lang_pair=st.none() | st.sampled_from(PAIRS),
    required_services=st.lists(st.sampled_from(SERVICES), max_size=2).map(tuple),
    labels=st.dictionaries(st.sampled_from(("zone", "gpu")), st.sampled_from("ab"), max_size=2),
    count=st.integers(1, 30),
    exclude_node_ids=st.frozensets(st.sampled_from([f"n{i}" for i in range(30)]), max_size=5),
    min_health=st.sampled_from((0.0, 0.5, 0.9)),
)


def first_failing(node: Node, sel: Selector) -> str:
    """An independent statement of the documented filter order."""
    if sel.pool_id and sel.pool_id not in node.pools:
        return "wrong_pool"
    if sel.lang_pair is not None and sel.lang_pair not in node.lang_pairs:
        return "wrong_lang_pair"
    if node.node_id in sel.exclude_node_ids:
        return "excluded_id"
    if node.status is NodeStatus.OFFLINE:
        return "offline"
    if node.status is NodeStatus.DRAINING:
        return "draining"
    if not set(sel.required_services) <= {s.name for s in node.services}:
        return "missing_service"
    if any(node.labels.get(k) != v for k, v in sel.labels.items()):
        return "labels"
    if node.health_score < sel.min_health:
        return "low_health"
    if node.running_jobs >= node.capacity:
        return "full"
    return "eligible"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes, selectors, st.integers(0, 2**32))
def test_breakdown_matches_the_documented_order(
    population: list[Node], sel: Selector, seed: int
) -> None:
    replica = replica_of(*population)
    result = select(replica, sel, random.Random(seed))
    b = result.breakdown

    expected = Counter(first_failing(n, sel) for n in population)
    assert counts(b) == {reason: expected[reason] for reason in REASONS}
    assert b.considered == len(population) == total(b)

    assert len(result.nodes) == min(sel.count, b.eligible)
    assert len({n.node_id for n in result.nodes}) == len(result.nodes)
    for node in result.nodes:
        assert first_failing(node, sel) == "eligible"
    # Ranked by band: never a lower band ahead of a higher one, and nothing left out
    # that belongs to a higher band than the last one taken.
    bands = [int(score(n) / BAND) for n in result.nodes]
    assert bands == sorted(bands, reverse=True)
    if result.nodes:
        chosen = {n.node_id for n in result.nodes}
        left_out = [
            n for n in population if first_failing(n, sel) == "eligible" and n.node_id not in chosen
        ]
        assert all(int(score(n) / BAND) <= bands[-1] for n in left_out)


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
