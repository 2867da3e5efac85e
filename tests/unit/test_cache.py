"""Replica: ordered apply, local writes ahead of the feed, snapshots, watch and resume."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.cache import Replica, Subscription, for_pool
from registry.index import lang_key, pool_key
from registry.model import Change, EventType, LanguagePair, Node, Pool
from tests.unit.factories import (
    assert_index_matches,
    delete,
    evolve,
    index_members,
    make_node,
    make_pool,
    put,
    put_pool,
)

EN_DE = LanguagePair("en", "de")
FR_DE = LanguagePair("fr", "de")


def drain(sub: Subscription) -> list[Change | None]:
    out: list[Change | None] = []
    while True:
        try:
            out.append(sub.queue.get_nowait())
        except asyncio.QueueEmpty:
            return out


def by_pool(replica: Replica) -> dict[str, set[str]]:
    """Pool -> member ids as the index holds them (every non-empty pool, nothing else),
    after checking that the public reads say the same."""
    idx = replica.index
    out = {
        key[1]: {idx.ids[slot] for slot in slots}
        for key, slots in idx._members.items()
        if key[0] == "pool"
    }
    for pool, members in out.items():
        assert isinstance(pool, str)
        assert {n.node_id for n in replica.candidates(pool, None)} == members
        assert index_members(idx, pool_key(pool)) == members
        assert replica.knows_pool(pool)
    return out  # type: ignore[return-value]


def by_lang(replica: Replica) -> dict[LanguagePair, set[str]]:
    """Language pair -> ids serving it, like ``by_pool``."""
    idx = replica.index
    out = {
        key[1]: {idx.ids[slot] for slot in slots}
        for key, slots in idx._members.items()
        if key[0] == "lang"
    }
    for pair, members in out.items():
        assert isinstance(pair, LanguagePair)
        assert {n.node_id for n in replica.candidates("", pair)} == members
        assert index_members(idx, lang_key(pair)) == members
    return out  # type: ignore[return-value]


def assert_indexes_consistent(replica: Replica) -> None:
    for node_id, node in replica.nodes.items():
        assert node.node_id == node_id
    assert_index_matches(replica.index, replica.nodes)
    expected_pools: dict[str, set[str]] = {}
    expected_pairs: dict[LanguagePair, set[str]] = {}
    for node in replica.nodes.values():
        for pool in node.pools:
            expected_pools.setdefault(pool, set()).add(node.node_id)
        for pair in node.lang_pairs:
            expected_pairs.setdefault(pair, set()).add(node.node_id)
    assert by_pool(replica) == expected_pools
    assert by_lang(replica) == expected_pairs


def event_key(change: Change | None) -> tuple[Any, ...]:
    assert change is not None
    return (change.version, change.type.value, change.node_id)


# --- apply -------------------------------------------------------------------------------


def test_apply_in_order_stores_nodes_and_indexes() -> None:
    replica = Replica()
    a = make_node("a", pools=["p1"], lang_pairs=[("en", "de")], version=1)
    b = make_node("b", pools=["p1", "p2"], lang_pairs=[("fr", "de")], version=2)
    replica.apply(put(a))
    replica.apply(put(b))

    assert replica.nodes == {"a": a, "b": b}
    assert replica.get("a") == a
    assert replica.get("zzz") is None
    assert len(replica) == 2
    assert by_pool(replica) == {"p1": {"a", "b"}, "p2": {"b"}}
    assert by_lang(replica) == {EN_DE: {"a"}, FR_DE: {"b"}}
    assert replica.version == 2
    assert replica.events_applied == 2


def test_pool_change_reindexes_and_drops_empty_sets() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    replica.apply(put(make_node("b", pools=["p1"], version=2)))
    moved = make_node("a", pools=["p2", "p3"], version=3)
    replica.apply(put(moved))
    assert by_pool(replica) == {"p1": {"b"}, "p2": {"a"}, "p3": {"a"}}

    replica.apply(put(make_node("b", pools=["p2"], version=4)))
    assert by_pool(replica) == {"p2": {"a", "b"}, "p3": {"a"}}
    assert "p1" not in by_pool(replica)
    assert_indexes_consistent(replica)


def test_lang_pair_change_reindexes() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", lang_pairs=[("en", "de")], version=1)))
    replica.apply(put(make_node("a", lang_pairs=[("fr", "de"), ("en", "de")], version=2)))
    assert by_lang(replica) == {EN_DE: {"a"}, FR_DE: {"a"}}
    replica.apply(put(make_node("a", lang_pairs=[("fr", "de")], version=3)))
    assert by_lang(replica) == {FR_DE: {"a"}}
    assert by_pool(replica) == {"p1": {"a"}}


def test_live_field_change_keeps_indexes_and_replaces_node() -> None:
    replica = Replica()
    node = make_node("a", version=1)
    replica.apply(put(node))
    busier = evolve(node, running_jobs=3, health_score=0.4, version=2)
    replica.apply(put(busier))
    assert replica.get("a") == busier
    assert by_pool(replica) == {"p1": {"a"}}
    assert by_lang(replica) == {EN_DE: {"a"}}


def test_delete_removes_node_and_empty_index_sets() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1", "p2"], version=1)))
    replica.apply(put(make_node("b", pools=["p1"], lang_pairs=[("fr", "de")], version=2)))
    replica.apply(delete("a", 3))
    assert set(replica.nodes) == {"b"}
    assert by_pool(replica) == {"p1": {"b"}}
    assert by_lang(replica) == {FR_DE: {"b"}}
    replica.apply(delete("b", 4))
    assert replica.nodes == {}
    assert by_pool(replica) == {}
    assert by_lang(replica) == {}
    assert replica.version == 4


def test_delete_of_unknown_node_still_advances_version() -> None:
    replica = Replica()
    replica.apply(delete("ghost", 7))
    assert replica.nodes == {}
    assert replica.version == 7
    assert replica.history_after(0) == [delete("ghost", 7)]


async def test_versions_at_or_below_current_are_ignored() -> None:
    replica = Replica()
    first = make_node("a", version=1)
    second = make_node("b", version=2)
    replica.apply(put(first))
    replica.apply(put(second))
    sub = replica.subscribe()

    replica.apply(put(make_node("a", pools=["other"], version=2)))
    replica.apply(put(make_node("c", version=1)))
    replica.apply(delete("a", 2))
    replica.apply(delete("b", 0))

    assert replica.nodes == {"a": first, "b": second}
    assert replica.version == 2
    assert replica.events_applied == 2
    assert replica.history_after(0) == [put(first), put(second)]
    assert drain(sub) == []


def test_candidates_use_both_indexes() -> None:
    replica = Replica()
    nodes = [
        make_node("a", pools=["p1"], lang_pairs=[("en", "de")], version=1),
        make_node("b", pools=["p1"], lang_pairs=[("fr", "de")], version=2),
        make_node("c", pools=["p2"], lang_pairs=[("en", "de")], version=3),
    ]
    for node in nodes:
        replica.apply(put(node))

    def ids(pool: str, pair: LanguagePair | None) -> list[str]:
        return sorted(n.node_id for n in replica.candidates(pool, pair))

    assert ids("", None) == ["a", "b", "c"]
    assert ids("p1", None) == ["a", "b"]
    assert ids("", EN_DE) == ["a", "c"]
    assert ids("p1", EN_DE) == ["a"]
    assert ids("p2", FR_DE) == []
    assert ids("nope", None) == []
    assert ids("", LanguagePair("xx", "yy")) == []


def test_snapshot_lists_pool_members_in_id_order() -> None:
    replica = Replica()
    for version, node_id in enumerate(["c", "a", "d", "b"], start=1):
        pools = ["p2"] if node_id == "d" else ["p1"]
        replica.apply(put(make_node(node_id, pools=pools, version=version)))
    assert [n.node_id for n in replica.snapshot("p1")] == ["a", "b", "c"]
    assert sorted(n.node_id for n in replica.snapshot()) == ["a", "b", "c", "d"]
    assert list(replica.snapshot("none")) == []


# --- local writes ------------------------------------------------------------------------


async def test_local_write_then_same_change_from_feed_is_one_event_and_one_node() -> None:
    replica = Replica()
    sub = replica.subscribe()
    node = make_node("a", version=5)

    replica.apply_local(node, "a", 5)
    assert replica.get("a") == node
    assert replica.version == 0, "a local write does not move the feed position"
    assert drain(sub) == []

    replica.apply(put(node))
    assert len(replica) == 1
    assert replica.get("a") == node
    assert replica.version == 5
    assert drain(sub) == [put(node)]
    assert_indexes_consistent(replica)


def test_local_write_is_replaced_only_by_newer_versions() -> None:
    replica = Replica()
    v3 = make_node("a", running_jobs=1, version=3)
    replica.apply_local(v3, "a", 3)
    replica.apply_local(evolve(v3, running_jobs=0, version=2), "a", 2)
    assert replica.get("a") == v3
    replica.apply(put(evolve(v3, running_jobs=0, version=2)))
    assert replica.get("a") == v3, "an older feed entry must not undo a newer local write"
    v4 = evolve(v3, running_jobs=2, version=4)
    replica.apply_local(v4, "a", 4)
    assert replica.get("a") == v4


def test_feed_catches_up_with_a_local_pool_move() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    moved = make_node("a", pools=["p2"], version=2)
    replica.apply_local(moved, "a", 2)
    assert by_pool(replica) == {"p2": {"a"}}
    replica.apply(put(moved))
    assert by_pool(replica) == {"p2": {"a"}}
    assert replica.get("a") == moved
    assert_indexes_consistent(replica)


async def test_local_delete_then_older_feed_put_does_not_resurrect() -> None:
    replica = Replica()
    sub = replica.subscribe()
    node = make_node("a", version=1)
    replica.apply(put(node))

    replica.apply_local(None, "a", 3)
    assert replica.get("a") is None
    assert by_pool(replica) == {}

    # A heartbeat logged before the delete reaches this replica after it.
    replica.apply(put(evolve(node, running_jobs=1, version=2)))
    assert replica.get("a") is None
    assert by_pool(replica) == {}
    assert by_lang(replica) == {}

    # An older local write (a slow RPC finishing late) must not resurrect it either.
    replica.apply_local(evolve(node, version=2), "a", 2)
    assert replica.get("a") is None

    replica.apply(delete("a", 3))
    assert replica.get("a") is None
    assert replica._tombstones == {}, "the feed reached the delete: tombstone dropped"

    # Registered again later: appears normally.
    again = make_node("a", version=4)
    replica.apply(put(again))
    assert replica.get("a") == again
    events = drain(sub)
    assert [event_key(e) for e in events] == [
        (1, "put", "a"),
        (2, "put", "a"),
        (3, "del", "a"),
        (4, "put", "a"),
    ]


def test_local_reregister_after_local_delete_is_kept() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", version=1)))
    replica.apply_local(None, "a", 2)
    again = make_node("a", pools=["p9"], version=3)
    replica.apply_local(again, "a", 3)
    assert replica.get("a") == again
    replica.apply(delete("a", 2))
    assert replica.get("a") == again, "the delete is older than the re-register"
    replica.apply(put(again))
    assert replica.get("a") == again
    assert by_pool(replica) == {"p9": {"a"}}


def test_local_delete_of_an_older_version_only() -> None:
    replica = Replica()
    node = make_node("a", version=5)
    replica.apply(put(node))
    replica.apply_local(None, "a", 4)
    assert replica.get("a") == node, "a delete older than the stored node is stale"


def test_tombstones_are_dropped_once_the_feed_passes_them() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", version=1)))
    replica.apply(put(make_node("b", version=2)))
    replica.apply_local(None, "a", 5)
    replica.apply_local(None, "b", 6)
    replica.apply(put(make_node("c", version=3)))
    assert replica._tombstones == {"a": 5, "b": 6}
    replica.apply(delete("a", 5))
    assert replica._tombstones == {"b": 6}
    replica.apply(delete("b", 6))
    assert replica._tombstones == {}
    assert set(replica.nodes) == {"c"}


def test_local_delete_of_a_node_not_yet_seen_is_not_resurrected_by_older_put() -> None:
    replica = Replica()
    # Another sidecar registered "a" at version 1; this replica's feed has not got it yet
    # when this sidecar deregisters it (Redis said existed=True, version 2).
    replica.apply_local(None, "a", 2)
    replica.apply(put(make_node("a", version=1)))
    assert replica.get("a") is None, "read-your-writes: the deregistered node came back"


def test_late_local_write_after_the_feed_delivered_a_delete_is_ignored() -> None:
    replica = Replica()
    registered = make_node("a", version=1)
    # RegisterNode got version 1 from Redis, but before its coroutine resumed the feed
    # delivered that write and a later delete (another sidecar, or expiry).
    replica.apply(put(registered))
    replica.apply(delete("a", 2))
    replica.apply_local(registered, "a", 1)
    assert replica.get("a") is None, "a ghost node: the feed will never delete it again"


# --- replace_all -------------------------------------------------------------------------


async def test_replace_all_publishes_the_difference() -> None:
    replica = Replica()
    a = make_node("a", pools=["p1"], version=1)
    b = make_node("b", pools=["p1"], version=2)
    c = make_node("c", pools=["p1"], version=3)
    for node in (a, b, c):
        replica.apply(put(node))
    everything = replica.subscribe()
    pool = replica.subscribe("p1")

    b2 = make_node("b", pools=["p2"], version=5)
    d = make_node("d", pools=["p1"], version=4)
    replica.replace_all([a, b2, d], 6)

    assert replica.nodes == {"a": a, "b": b2, "d": d}
    assert by_pool(replica) == {"p1": {"a", "d"}, "p2": {"b"}}
    assert replica.version == 6
    assert replica.reloads == 1

    seen = drain(everything)
    assert sorted(map(event_key, seen)) == [(6, "del", "c"), (6, "put", "b"), (6, "put", "d")]
    assert Change(6, EventType.PUT, "b", b2) in seen
    assert Change(6, EventType.PUT, "d", d) in seen
    # The pool watcher hears that b left p1 and c is gone; a did not change.
    assert sorted(map(event_key, drain(pool))) == [
        (6, "del", "b"),
        (6, "del", "c"),
        (6, "put", "d"),
    ]
    assert_indexes_consistent(replica)


async def test_replace_all_with_identical_content_is_silent() -> None:
    replica = Replica()
    nodes = [make_node("a", version=1), make_node("b", version=2)]
    for node in nodes:
        replica.apply(put(node))
    sub = replica.subscribe()
    replica.replace_all(nodes, 2)
    assert drain(sub) == []


async def test_replace_all_puts_a_node_known_only_from_a_local_write() -> None:
    replica = Replica()
    sub = replica.subscribe()
    node = make_node("a", version=3)
    replica.apply_local(node, "a", 3)
    replica.replace_all([node], 3)
    assert drain(sub) == [Change(3, EventType.PUT, "a", node)]


async def test_replace_all_deletes_a_locally_deleted_node_for_pool_watchers() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    pool = replica.subscribe("p1")
    replica.apply_local(None, "a", 2)
    replica.replace_all([], 2)
    assert drain(pool) == [delete("a", 2)]
    assert replica._tombstones == {}


async def test_replace_all_tells_watchers_about_a_local_write_the_feed_skipped() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    everything = replica.subscribe()
    old_pool = replica.subscribe("p1")
    new_pool = replica.subscribe("p2")
    moved = make_node("a", pools=["p2"], version=2)
    replica.apply_local(moved, "a", 2)
    # The feed lost its place (log trimmed): reload from a snapshot that has the move.
    replica.replace_all([moved], 2)
    assert drain(everything) == [Change(2, EventType.PUT, "a", moved)]
    assert drain(old_pool) == [delete("a", 2)]
    assert drain(new_pool) == [Change(2, EventType.PUT, "a", moved)]


def test_replace_all_resets_history() -> None:
    replica = Replica()
    changes = [put(make_node(f"n{v}", version=v)) for v in (1, 2, 3)]
    for change in changes:
        replica.apply(change)
    assert replica.history_after(1) == changes[1:]

    replica.replace_all([make_node("x", version=9)], 10)
    assert replica.history_after(3) is None
    assert replica.history_after(0) is None
    assert replica.history_after(9) is None
    assert replica.history_after(10) == []

    later = put(make_node("y", version=11))
    replica.apply(later)
    assert replica.history_after(10) == [later]
    assert replica.history_after(11) == []
    assert replica.history_after(12) is None


# --- pools -------------------------------------------------------------------------------


async def test_pool_change_stores_the_pool_and_tells_no_watcher() -> None:
    replica = Replica()
    node = make_node("a", pools=["p1"], version=1)
    replica.apply(put(node))
    everything = replica.subscribe()
    p1 = replica.subscribe("p1")

    pool = make_pool("p1", min_health=0.5, labels={"zone": "a"}, version=2)
    replica.apply(put_pool(pool))
    assert replica.pools == {"p1": pool}
    assert replica.version == 2
    assert replica.events_applied == 2
    assert drain(everything) == []
    assert drain(p1) == []
    assert replica.history_after(0) == [put(node)], "a pool change is no node event"
    assert replica.history_after(1) == []
    assert replica.history_after(2) == []

    # The next node change is delivered and resumable as usual.
    later = put(evolve(node, running_jobs=1, version=3))
    replica.apply(later)
    assert drain(everything) == [later]
    assert drain(p1) == [later]
    assert replica.history_after(2) == [later]
    assert replica.nodes == {"a": later.node}
    assert_indexes_consistent(replica)


def test_pool_change_replaces_an_older_configuration() -> None:
    replica = Replica()
    replica.apply(put_pool(make_pool("p1", min_health=0.1, version=1)))
    replica.apply(put_pool(make_pool("p2", version=2)))
    newer = make_pool("p1", min_health=0.9, version=3)
    replica.apply(put_pool(newer))
    assert replica.pools["p1"] == newer
    assert set(replica.pools) == {"p1", "p2"}
    # At or below the replica's version: ignored, like any change.
    replica.apply(put_pool(make_pool("p1", min_health=0.2), version=3))
    replica.apply(put_pool(make_pool("p3"), version=1))
    assert replica.pools["p1"] == newer
    assert "p3" not in replica.pools
    assert replica.version == 3
    assert replica.events_applied == 3


def test_local_pool_write_then_the_feed() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", version=1)))
    pool = make_pool("p1", min_health=0.4, version=3)
    replica.apply_local_pool(pool)
    assert replica.pools == {"p1": pool}, "read your own write"
    assert replica.version == 1, "a local write does not move the feed position"

    # An older configuration from the feed does not undo the newer local write.
    replica.apply(put_pool(make_pool("p1", min_health=0.1, version=2)))
    assert replica.pools["p1"] == pool
    assert replica.version == 2
    replica.apply(put_pool(pool))
    assert replica.pools["p1"] == pool
    assert replica.version == 3

    # An older local write (a slow PutPool finishing late) changes nothing.
    replica.apply_local_pool(make_pool("p1", min_health=0.2, version=4))
    replica.apply_local_pool(make_pool("p1", min_health=0.3, version=4))
    assert replica.pools["p1"].min_health == 0.2, "same version: the first one stays"


@pytest.mark.parametrize("at", [0, 4, 5])
def test_local_pool_write_the_feed_already_passed_is_skipped(at: int) -> None:
    replica = Replica()
    replica.apply(put(make_node("a", version=5)))
    assert replica.version == 5
    replica.apply_local_pool(make_pool("p1", version=at))
    assert replica.pools == {}, "the feed holds this change or a later one already"
    replica.apply_local_pool(make_pool("p1", version=6))
    assert set(replica.pools) == {"p1"}


async def test_replace_all_swaps_the_pools_silently() -> None:
    replica = Replica()
    node = make_node("a", pools=["p1"], version=1)
    replica.apply(put(node))
    replica.apply(put_pool(make_pool("p1", version=2)))
    replica.apply(put_pool(make_pool("gone", version=3)))
    sub = replica.subscribe()
    kept = make_pool("p1", min_health=0.7, version=5)
    fresh = make_pool("p9", lang_pairs=[("en", "de")], version=4)
    replica.replace_all([node], 6, [kept, fresh])
    assert replica.pools == {"p1": kept, "p9": fresh}
    assert replica.version == 6
    assert drain(sub) == []
    replica.replace_all([node], 7)
    assert replica.pools == {}


def test_knows_pool() -> None:
    replica = Replica()
    assert not replica.knows_pool("p1")
    replica.apply(put(make_node("a", pools=["declared"], version=1)))
    replica.apply(put_pool(make_pool("configured", version=2)))
    assert replica.knows_pool("declared"), "declared by a node only"
    assert replica.knows_pool("configured"), "configured, no members"
    assert not replica.knows_pool("p1")
    assert list(replica.candidates("configured", None)) == []
    replica.apply(put(make_node("a", pools=["other"], version=3)))
    assert not replica.knows_pool("declared"), "its last member left"
    replica.apply(delete("a", 4))
    assert not replica.knows_pool("other")
    assert replica.knows_pool("configured")


# --- history -----------------------------------------------------------------------------


def test_history_after_returns_exactly_the_later_changes() -> None:
    replica = Replica()
    changes = [
        put(make_node("a", version=1)),
        put(make_node("b", version=2)),
        delete("a", 3),
        put(make_node("c", version=5)),
    ]
    for change in changes:
        replica.apply(change)
    assert replica.history_after(0) == changes
    assert replica.history_after(1) == changes[1:]
    assert replica.history_after(3) == changes[3:]
    assert replica.history_after(4) == changes[3:]
    assert replica.history_after(5) == []
    assert replica.history_after(6) is None
    assert replica.history_after(-1) is None


def test_history_after_below_the_floor_is_none() -> None:
    replica = Replica(history=3)
    changes = [put(make_node(f"n{v}", version=v)) for v in range(1, 6)]
    for change in changes:
        replica.apply(change)
    # Only versions 3, 4, 5 are kept: resuming after 2 is still exact, after 1 is not.
    assert replica.history_after(2) == changes[2:]
    assert replica.history_after(4) == changes[4:]
    assert replica.history_after(1) is None
    assert replica.history_after(0) is None


def test_empty_replica_history() -> None:
    replica = Replica()
    assert replica.history_after(0) == []
    assert replica.history_after(1) is None


def test_history_after_for_a_pool() -> None:
    replica = Replica()
    a1 = make_node("a", pools=["p1"], version=1)
    a2 = make_node("a", pools=["p2"], version=2)
    b3 = make_node("b", pools=["p1", "p2"], version=3)
    for change in (put(a1), put(a2), put(b3), delete("b", 4)):
        replica.apply(change)

    assert replica.history_after(0, "p1") == [put(a1), delete("a", 2), put(b3), delete("b", 4)]
    assert replica.history_after(0, "p2") == [put(a2), put(b3), delete("b", 4)]
    assert replica.history_after(1, "p1") == [delete("a", 2), put(b3), delete("b", 4)]
    assert replica.history_after(0, "p3") == []


def test_history_after_for_a_pool_after_a_local_move() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    moved = make_node("a", pools=["p2"], version=2)
    replica.apply_local(moved, "a", 2)
    replica.apply(put(moved))
    assert replica.history_after(1, "p1") == [delete("a", 2)]
    assert replica.history_after(1, "p2") == [put(moved)]


def test_for_pool() -> None:
    node = make_node("a", pools=["p1"], version=4)
    change = put(node)
    assert for_pool(change, frozenset(), "") is change
    assert for_pool(change, frozenset(), "p1") is change
    assert for_pool(change, frozenset({"p2"}), "p2") == delete("a", 4)
    assert for_pool(change, frozenset({"p3"}), "p2") is None
    assert for_pool(delete("a", 5), frozenset({"p1"}), "p1") == delete("a", 5)
    assert for_pool(delete("a", 5), frozenset({"p1"}), "p2") is None


# --- watch -------------------------------------------------------------------------------


async def test_pool_subscription_hears_a_node_leave_its_pool() -> None:
    replica = Replica()
    everything = replica.subscribe()
    p1 = replica.subscribe("p1")
    p2 = replica.subscribe("p2")
    p3 = replica.subscribe("p3")

    a1 = make_node("a", pools=["p1"], version=1)
    a2 = make_node("a", pools=["p2"], version=2)
    replica.apply(put(a1))
    replica.apply(put(a2))
    replica.apply(delete("a", 3))

    assert drain(everything) == [put(a1), put(a2), delete("a", 3)]
    assert drain(p1) == [put(a1), delete("a", 2)]
    assert drain(p2) == [put(a2), delete("a", 3)]
    assert drain(p3) == []


async def test_pool_subscription_hears_a_leave_first_applied_locally() -> None:
    replica = Replica()
    replica.apply(put(make_node("a", pools=["p1"], version=1)))
    p1 = replica.subscribe("p1")
    p2 = replica.subscribe("p2")

    moved = make_node("a", pools=["p2"], version=2)
    replica.apply_local(moved, "a", 2)
    assert drain(p1) == []
    replica.apply(put(moved))
    assert drain(p1) == [delete("a", 2)]
    assert drain(p2) == [put(moved)]


async def test_overflow_ends_the_subscription_with_a_single_marker() -> None:
    replica = Replica(watch_queue_max=2)
    slow = replica.subscribe()
    quiet = replica.subscribe("elsewhere")
    assert replica.watchers == 2

    replica.apply(put(make_node("a", version=1)))
    replica.apply(put(make_node("b", version=2)))
    assert replica.watchers == 2, "a full queue is not yet an overflow"
    replica.apply(put(make_node("c", version=3)))

    assert slow.overflowed
    assert replica.watchers == 1
    assert drain(slow) == [None]

    replica.apply(put(make_node("d", version=4)))
    assert drain(slow) == [], "an ended subscription gets nothing more"
    assert not quiet.overflowed
    assert drain(quiet) == []


async def test_unsubscribe_stops_delivery() -> None:
    replica = Replica()
    sub = replica.subscribe()
    assert replica.watchers == 1
    replica.unsubscribe(sub)
    assert replica.watchers == 0
    replica.apply(put(make_node("a", version=1)))
    assert drain(sub) == []
    replica.unsubscribe(sub)  # twice is harmless
    assert replica.watchers == 0


async def test_end_stops_delivery_and_wakes_the_reader() -> None:
    replica = Replica()
    sub = replica.subscribe()
    other = replica.subscribe()
    replica.apply(put(make_node("a", version=1)))
    replica.end(sub)
    assert replica.watchers == 1
    assert not sub.overflowed
    assert drain(sub) == [None]
    replica.apply(put(make_node("b", version=2)))
    assert drain(sub) == []
    assert [event_key(e) for e in drain(other)] == [(1, "put", "a"), (2, "put", "b")]


async def test_subscriber_can_await_events() -> None:
    replica = Replica()
    sub = replica.subscribe()
    change = put(make_node("a", version=1))
    asyncio.get_running_loop().call_soon(replica.apply, change)
    assert await asyncio.wait_for(sub.queue.get(), 1) == change


def test_staleness_is_minus_one_until_synced() -> None:
    replica = Replica()
    assert replica.staleness_ms() == -1
    replica.mark_synced()
    assert 0 <= replica.staleness_ms() < 1_000


# --- properties --------------------------------------------------------------------------

IDS = ("a", "b", "c")
POOLS = ("p1", "p2")
PAIRS = (("en", "de"), ("fr", "de"))

_entry = st.one_of(
    st.tuples(
        st.sampled_from(IDS),
        st.frozensets(st.sampled_from(POOLS)),
        st.frozensets(st.sampled_from(PAIRS)),
        st.integers(0, 2),
    ),
    st.tuples(st.sampled_from(IDS), st.none(), st.none(), st.none()),
    # A pool's configuration changes (PutPool): in the log, never seen by watchers.
    st.tuples(st.just("pool"), st.sampled_from(POOLS), st.sampled_from((0.0, 0.5, 0.9))),
)


def build_log(
    entries: list[tuple[Any, ...]],
) -> tuple[list[Change], list[dict[str, Node]], list[dict[str, Pool]]]:
    """A consistent change log and the registry's nodes and pools after each version
    (index = version)."""
    state: dict[str, Node] = {}
    pools: dict[str, Pool] = {}
    states: list[dict[str, Node]] = [{}]
    pool_states: list[dict[str, Pool]] = [{}]
    log: list[Change] = []
    for entry in entries:
        version = len(log) + 1
        if entry[0] == "pool":
            _, pool_id, min_health = entry
            pool = make_pool(pool_id, min_health=min_health, version=version)
            log.append(put_pool(pool))
            pools[pool_id] = pool
        else:
            node_id, node_pools, pairs, jobs = entry
            if node_pools is None:
                if node_id not in state:
                    node = make_node(node_id, pools=[], lang_pairs=[], version=version)
                    log.append(put(node))
                    state[node_id] = node
                else:
                    log.append(delete(node_id, version))
                    del state[node_id]
            else:
                node = make_node(
                    node_id, pools=node_pools, lang_pairs=pairs, running_jobs=jobs, version=version
                )
                log.append(put(node))
                state[node_id] = node
        states.append(dict(state))
        pool_states.append(dict(pools))
    return log, states, pool_states


def apply_local_entry(replica: Replica, change: Change) -> None:
    if change.type is EventType.POOL:
        assert change.pool is not None
        replica.apply_local_pool(change.pool)
    else:
        replica.apply_local(change.node, change.node_id, change.version)


def materialize(view: dict[str, Node], events: Iterable[Change | None]) -> None:
    for event in events:
        assert event is not None, "no overflow expected"
        assert event.type is not EventType.POOL, "watchers only hear of nodes"
        if event.type is EventType.PUT:
            assert event.node is not None
            view[event.node_id] = event.node
        else:
            view.pop(event.node_id, None)


def in_pool(state: dict[str, Node], pool: str) -> dict[str, Node]:
    return {k: n for k, n in state.items() if not pool or pool in n.pools}


def run_schedule(data: st.DataObject) -> None:
    entries = data.draw(st.lists(_entry, min_size=1, max_size=20), label="entries")
    log, states, pool_states = build_log(entries)
    replica = Replica(history=1_000, watch_queue_max=10_000)
    subs = {pool: replica.subscribe(pool) for pool in ("", *POOLS)}
    views: dict[str, dict[str, Node]] = {pool: {} for pool in subs}
    position = 0  # versions up to here were delivered by the feed
    local_max = 0
    reloaded = False

    steps = data.draw(st.lists(st.sampled_from(("feed", "local", "reload")), max_size=60))
    for step in steps:
        if step == "feed" and position < len(log):
            replica.apply(log[position])
            position += 1
        elif step == "local" and position < len(log):
            # A local write reaches the replica before the feed delivers it. (A write
            # applied after the feed passed it has its own test above.)
            change = data.draw(st.sampled_from(log[position:]), label="local")
            apply_local_entry(replica, change)
            local_max = max(local_max, change.version)
        elif step == "reload":
            # Any time, local writes the snapshot does not have included.
            version = data.draw(st.integers(position, len(log)), label="reload at")
            replica.replace_all(states[version].values(), version, pool_states[version].values())
            position = version
            reloaded = True
        assert_indexes_consistent(replica)
        assert replica.version == position
        if position >= local_max:
            # Every local write has been delivered: the replica is exactly the log state.
            assert replica.nodes == states[position]
            assert replica.pools == pool_states[position]
        for pool, sub in subs.items():
            materialize(views[pool], drain(sub))

    while position < len(log):
        replica.apply(log[position])
        position += 1
        assert_indexes_consistent(replica)

    final = states[-1]
    assert replica.nodes == final
    assert replica.pools == pool_states[-1]
    assert replica._tombstones == {}
    for pool, sub in subs.items():
        materialize(views[pool], drain(sub))
        assert views[pool] == in_pool(final, pool), pool
        if not reloaded:
            resumed: dict[str, Node] = {}
            backlog = replica.history_after(0, pool)
            assert backlog is not None
            materialize(resumed, backlog)
            assert resumed == in_pool(final, pool), pool


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_interleaving_keeps_indexes_and_watchers_converge(data: st.DataObject) -> None:
    run_schedule(data)
