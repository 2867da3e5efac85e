"""NodeIndex: slots, columns and cached membership masks stay in step with the nodes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.index import (
    EMPTY,
    METRIC_COLUMNS,
    STATUS_CODE,
    NodeIndex,
    label_key,
    lang_key,
    memberships,
    pool_key,
    service_key,
)
from registry.model import LanguagePair, Metrics, Node, NodeStatus
from tests.unit.factories import assert_index_matches as assert_matches
from tests.unit.factories import evolve, make_node
from tests.unit.factories import index_members as members

EN_DE = LanguagePair("en", "de")
FR_DE = LanguagePair("fr", "de")


def test_status_codes() -> None:
    assert STATUS_CODE == {NodeStatus.ONLINE: 1, NodeStatus.DRAINING: 2, NodeStatus.OFFLINE: 3}
    assert EMPTY not in STATUS_CODE.values()
    idx = NodeIndex(initial=4)
    for i, status in enumerate(NodeStatus):
        idx.put(make_node(f"n{i}", status=status))
    assert list(idx.status[:3]) == [1, 2, 3]
    assert list(idx.status[3:]) == [EMPTY]
    assert list(idx.used()) == [True, True, True]


def test_metric_columns_are_in_health_vector_order() -> None:
    assert METRIC_COLUMNS == ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")
    idx = NodeIndex(initial=2)
    m = Metrics(cpu=0.1, gpu=0.2, mem=0.3, load=0.4, error_rate=0.6, heartbeat_delay=0.5)
    idx.put(make_node("a", metrics=m))
    assert list(idx.metrics[0]) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_memberships() -> None:
    node = make_node(
        "a", pools=["p1", "p2"], lang_pairs=[("en", "de")], services=["mt"], labels={"z": "1"}
    )
    assert memberships(node) == {
        pool_key("p1"),
        pool_key("p2"),
        lang_key(EN_DE),
        service_key("mt"),
        label_key("z", "1"),
    }
    # Kinds never collide: a pool and a service of the same name are different keys.
    assert pool_key("mt") != service_key("mt")


def test_put_fills_columns_and_masks() -> None:
    idx = NodeIndex(initial=8)
    a = make_node("a", pools=["p1"], capacity=3, running_jobs=1, health=0.7)
    b = make_node("b", pools=["p1", "p2"], lang_pairs=[("fr", "de")], status=NodeStatus.DRAINING)
    idx.put(a)
    idx.put(b)
    assert idx.size == 2
    assert idx.slot("a") == 0
    assert idx.slot("b") == 1
    assert idx.slot("zzz") is None
    assert list(idx.mask(pool_key("p1"))) == [True, True]
    assert list(idx.mask(pool_key("p2"))) == [False, True]
    assert list(idx.mask(pool_key("nope"))) == [False, False]
    assert list(idx.mask(lang_key(EN_DE))) == [True, False]
    assert list(idx.any_of([lang_key(EN_DE), lang_key(FR_DE)])) == [True, True]
    assert list(idx.any_of([])) == [False, False]
    assert list(idx.slots_of(["b", "ghost"])) == [False, True]
    assert_matches(idx, {"a": a, "b": b})


def test_put_again_updates_in_place() -> None:
    idx = NodeIndex(initial=4)
    a = make_node("a", pools=["p1"], labels={"zone": "x"})
    idx.put(a)
    busier = evolve(a, running_jobs=3, health_score=0.25, status=NodeStatus.OFFLINE)
    idx.put(busier)
    assert idx.size == 1
    assert idx.slot("a") == 0
    assert_matches(idx, {"a": busier})
    moved = make_node("a", pools=["p2"], labels={"zone": "y"})
    idx.put(moved)
    assert idx.size == 1
    assert pool_key("p1") not in idx._members
    assert label_key("zone", "x") not in idx._members
    assert_matches(idx, {"a": moved})


def test_remove_frees_the_slot_and_reuse_takes_it() -> None:
    idx = NodeIndex(initial=4)
    nodes = {n: make_node(n, pools=[f"pool-{n}", "all"]) for n in ("a", "b", "c")}
    for node in nodes.values():
        idx.put(node)
    freed = idx.slot("b")
    idx.remove("b")
    del nodes["b"]
    assert idx.slot("b") is None
    assert idx.ids[freed] == ""  # type: ignore[index]
    assert idx.size == 3, "a freed slot stays in the arrays"
    assert list(idx.used()) == [True, False, True]
    assert pool_key("pool-b") not in idx._members
    assert_matches(idx, nodes)

    idx.remove("b")  # twice is harmless
    idx.remove("never")
    assert_matches(idx, nodes)

    d = make_node("d", pools=["all"], running_jobs=2, capacity=2)
    idx.put(d)
    nodes["d"] = d
    assert idx.slot("d") == freed, "the free slot is reused before the arrays grow"
    assert idx.size == 3
    assert_matches(idx, nodes)


def test_growth_past_the_initial_capacity_keeps_columns_and_masks() -> None:
    idx = NodeIndex(initial=4)
    nodes: dict[str, Node] = {}
    for i in range(50):
        node = make_node(
            f"n{i:02}",
            pools=[f"p{i % 3}"],
            lang_pairs=[("en", "de")] if i % 2 else [("fr", "de")],
            labels={"mod5": str(i % 5)},
            capacity=i,
            running_jobs=i // 2,
            health=i / 100,
            status=list(NodeStatus)[i % 3],
            metrics=Metrics(cpu=i / 50, heartbeat_delay=i / 100),
        )
        idx.put(node)
        nodes[node.node_id] = node
        # A mask cached at one size must not be served at the next.
        assert len(idx.mask(pool_key("p0"))) == idx.size
        assert_matches(idx, nodes)
    assert idx.size == 50
    assert len(idx.status) >= 50
    assert members(idx, pool_key("p1")) == {f"n{i:02}" for i in range(50) if i % 3 == 1}
    assert members(idx, label_key("mod5", "4")) == {f"n{i:02}" for i in range(50) if i % 5 == 4}
    # Removing and re-adding after growth still works.
    for i in range(0, 50, 7):
        idx.remove(f"n{i:02}")
        del nodes[f"n{i:02}"]
    assert_matches(idx, nodes)


def test_growth_from_one_slot() -> None:
    idx = NodeIndex(initial=1)
    nodes = {f"n{i}": make_node(f"n{i}", health=0.5 + i / 100) for i in range(9)}
    for node in nodes.values():
        idx.put(node)
    assert_matches(idx, nodes)


def test_mask_cache_is_invalidated_when_membership_changes() -> None:
    idx = NodeIndex(initial=8)
    idx.put(make_node("a", pools=["p1"]))
    idx.put(make_node("b", pools=["p2"]))
    first = idx.mask(pool_key("p1"))
    assert idx.mask(pool_key("p1")) is first, "cached while nothing changes"
    assert list(first) == [True, False]

    idx.put(make_node("b", pools=["p1"]))  # joins
    assert list(idx.mask(pool_key("p1"))) == [True, True]
    assert list(idx.mask(pool_key("p2"))) == [False, False]

    idx.remove("a")  # leaves
    assert list(idx.mask(pool_key("p1"))) == [False, True]

    idx.put(make_node("c", pools=["p1"]))  # takes a's slot
    assert idx.slot("c") == 0
    assert list(idx.mask(pool_key("p1"))) == [True, True]

    cached = idx.mask(pool_key("p1"))
    idx.put(evolve(make_node("c", pools=["p1"]), running_jobs=1, health_score=0.5))
    assert idx.running[0] == 1
    assert idx.mask(pool_key("p1")) is cached, "a live-field change keeps the cache"


def test_clear_empties_everything() -> None:
    idx = NodeIndex(initial=2)
    for i in range(5):
        idx.put(make_node(f"n{i}", pools=["p1"]))
    idx.mask(pool_key("p1"))
    idx.clear()
    assert len(idx) == 0
    assert idx.size == 0
    assert idx._members == {}
    assert list(idx.mask(pool_key("p1"))) == []
    idx.put(make_node("x", pools=["p1"]))
    assert idx.slot("x") == 0
    assert list(idx.mask(pool_key("p1"))) == [True]


def test_masks_of_keys_without_members_are_not_kept() -> None:
    idx = NodeIndex(initial=4)
    idx.put(make_node("a"))
    for i in range(100):
        idx.mask(label_key("zone", f"z{i}"))
    assert len(idx._masks) <= len(idx._members)


# --- property ----------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.sampled_from("abcdefghij"),
            st.frozensets(st.sampled_from(("p1", "p2", "p3"))),
            st.frozensets(st.sampled_from((("en", "de"), ("fr", "de")))),
            st.integers(0, 3),
            st.sampled_from(NodeStatus),
        ),
        st.tuples(st.just("remove"), st.sampled_from("abcdefghij")),
        st.tuples(st.just("mask"), st.sampled_from(("p1", "p2", "p3"))),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_any_sequence_of_puts_and_removes_matches_the_nodes(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    idx = NodeIndex(initial=2)
    nodes: dict[str, Node] = {}
    for op in ops:
        if op[0] == "put":
            _, node_id, pools, pairs, jobs, status = op
            node = make_node(
                node_id, pools=pools, lang_pairs=pairs, running_jobs=jobs, status=status
            )
            idx.put(node)
            nodes[node_id] = node
        elif op[0] == "remove":
            idx.remove(op[1])
            nodes.pop(op[1], None)
        else:
            idx.mask(pool_key(op[1]))  # populate the cache between changes
        assert_matches(idx, nodes)
