"""Input checks: every rejection names the offending field, every bound is exact."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest

from registry import validation
from registry.errors import InvalidArgument, RegistryError
from registry.model import (
    InstalledService,
    LanguagePair,
    Metrics,
    NodeSpec,
    Pool,
    SelectionWeights,
    Selector,
)

GOOD_SPEC = NodeSpec(
    node_id="node-1",
    address="10.0.0.1:7000",
    pools=("pool.a", "pool_b"),
    lang_pairs=(LanguagePair("en", "de"), LanguagePair("zh-Hans", "pt-BR")),
    services=(InstalledService("mt", "nmt", "1.2.3"),),
    labels={"zone": "eu-1"},
    capacity=8,
)


def rejects(call: Callable[[], object], field: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        call()
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, RegistryError)
    return info.value


def spec(**changes: Any) -> NodeSpec:
    return dataclasses.replace(GOOD_SPEC, **changes)


# --- ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "A-z_0.9", "x" * 128, "node.eu-west-1_7", "-", "...", "0"])
def test_valid_ids(value: str) -> None:
    assert validation.check_id("node_id", value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 129,
        "a{b",
        "a}b",
        "{tag}",
        "a:b",
        "a b",
        " a",
        "a\n",
        "a\t",
        "a/b",
        "a*",
        "é",
        "ａ",  # noqa: RUF001 - a fullwidth letter: not ASCII
        "٣",  # an Arabic-Indic digit: str.isdigit() but not [0-9]
    ],
)
def test_invalid_ids_name_the_field(value: str) -> None:
    rejects(lambda: validation.check_id("node_id", value), "node_id")


def test_optional_id_accepts_empty_only() -> None:
    assert validation.check_optional_id("pool_id", "") == ""
    assert validation.check_optional_id("pool_id", "p1") == "p1"
    rejects(lambda: validation.check_optional_id("pool_id", "a:b"), "pool_id")


# --- specs -------------------------------------------------------------------------------


def test_good_spec_passes_unchanged() -> None:
    assert validation.check_spec(GOOD_SPEC) is GOOD_SPEC
    assert validation.check_spec(spec(pools=(), lang_pairs=(), services=(), labels={}))
    assert validation.check_spec(spec(capacity=0)).capacity == 0
    assert validation.check_spec(spec(capacity=validation.MAX_CAPACITY))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"node_id": ""}, "node.node_id"),
        ({"node_id": "a:b"}, "node.node_id"),
        ({"node_id": "x" * 129}, "node.node_id"),
        ({"address": "x" * 513}, "node.address"),
        ({"capacity": -1}, "node.capacity"),
        ({"capacity": validation.MAX_CAPACITY + 1}, "node.capacity"),
        ({"pools": ("ok", "bad pool")}, "node.pools[1]"),
        ({"pools": ("{p}",)}, "node.pools[0]"),
        ({"pools": ("ok", "")}, "node.pools[1]"),
        ({"pools": tuple(f"p{i}" for i in range(257))}, "node.pools"),
        ({"lang_pairs": (LanguagePair("", "de"),)}, "node.lang_pairs[0].src"),
        (
            {"lang_pairs": (LanguagePair("en", "de"), LanguagePair("en", ""))},
            "node.lang_pairs[1].tgt",
        ),
        ({"lang_pairs": (LanguagePair("e n", "de"),)}, "node.lang_pairs[0].src"),
        ({"lang_pairs": (LanguagePair("en", "d" * 36),)}, "node.lang_pairs[0].tgt"),
        (
            {"lang_pairs": tuple(LanguagePair("en", f"x{i}") for i in range(257))},
            "node.lang_pairs",
        ),
        ({"services": (InstalledService(""),)}, "node.services[0].name"),
        (
            {"services": (InstalledService("mt"), InstalledService("x" * 129))},
            "node.services[1].name",
        ),
        ({"services": (InstalledService("mt", "t" * 129),)}, "node.services[0].type"),
        ({"services": (InstalledService("mt", "", "v" * 129),)}, "node.services[0].version"),
        (
            {"services": tuple(InstalledService(f"s{i}") for i in range(257))},
            "node.services",
        ),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "node.labels"),
        ({"labels": {"": "v"}}, "node.labels['']"),
        ({"labels": {"k" * 129: "v"}}, f"node.labels[{'k' * 32!r}]"),
        ({"labels": {"zone": "v" * 257}}, "node.labels['zone']"),
    ],
)
def test_bad_spec_names_the_field(changes: dict[str, Any], field: str) -> None:
    rejects(lambda: validation.check_spec(spec(**changes)), field)


@pytest.mark.parametrize(
    "changes",
    [
        {"address": "x" * 512},
        {"pools": tuple(f"p{i}" for i in range(256))},
        {"lang_pairs": (LanguagePair("e", "d" * 35),)},
        {"services": (InstalledService("n" * 128, "t" * 128, "v" * 128),)},
        {"labels": {f"k{i}": "v" for i in range(64)}},
        {"labels": {"k" * 128: "v" * 256}},
        {"labels": {"any key: at all {}": ""}},
    ],
)
def test_spec_limits_are_inclusive(changes: dict[str, Any]) -> None:
    validation.check_spec(spec(**changes))


def test_spec_field_prefix_is_configurable() -> None:
    rejects(
        lambda: validation.check_spec(spec(pools=("a", "b", "c:d")), "req.node"),
        "req.node.pools[2]",
    )


# --- metrics and fractions ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu", "mem", "load", "error_rate"])
@pytest.mark.parametrize("bad", [math.nan, -0.01, 1.01, -math.inf, math.inf, 2.0])
def test_bad_metric_names_the_metric(name: str, bad: float) -> None:
    metrics = Metrics(**{name: bad})
    rejects(lambda: validation.check_metrics("metrics", metrics), f"metrics.{name}")


def test_metric_bounds_are_inclusive() -> None:
    zero = Metrics()
    full = Metrics(1.0, 1.0, 1.0, 1.0, 1.0)
    assert validation.check_metrics("metrics", zero) is zero
    assert validation.check_metrics("metrics", full) is full
    assert validation.check_fraction("x", -0.0) == 0.0


# --- ttl ---------------------------------------------------------------------------------


def test_ttl_zero_means_default() -> None:
    assert validation.check_ttl("ttl_ms", 0, 3_000, 500, 60_000) == 3_000


@pytest.mark.parametrize("ttl", [500, 501, 59_999, 60_000])
def test_ttl_within_range(ttl: int) -> None:
    assert validation.check_ttl("ttl_ms", ttl, 3_000, 500, 60_000) == ttl


@pytest.mark.parametrize("ttl", [-1, 1, 499, 60_001, 10**12])
def test_ttl_out_of_range(ttl: int) -> None:
    rejects(lambda: validation.check_ttl("ttl_ms", ttl, 3_000, 500, 60_000), "ttl_ms")


# --- selectors ---------------------------------------------------------------------------


def test_good_selector_passes() -> None:
    sel = Selector(
        pool_id="p1",
        lang_pair=LanguagePair("en", "de"),
        required_services=("mt", "asr"),
        labels={"zone": "a"},
        count=3,
        exclude_node_ids=frozenset({"n1", "n2"}),
        min_health=0.5,
    )
    assert validation.check_selector(sel) is sel
    assert validation.check_selector(Selector()) == Selector()


@pytest.mark.parametrize("count", [1, 2, 999, 1000])
def test_selector_count_in_bounds(count: int) -> None:
    assert validation.check_selector(Selector(count=count)).count == count


@pytest.mark.parametrize("count", [0, -1, 1001, 10**9])
def test_selector_count_out_of_bounds(count: int) -> None:
    rejects(lambda: validation.check_selector(Selector(count=count)), "count")


@pytest.mark.parametrize("health", [0.0, 0.5, 1.0])
def test_selector_min_health_in_bounds(health: float) -> None:
    assert validation.check_selector(Selector(min_health=health)).min_health == health


@pytest.mark.parametrize("health", [-0.1, 1.1, math.nan, math.inf])
def test_selector_min_health_out_of_bounds(health: float) -> None:
    rejects(lambda: validation.check_selector(Selector(min_health=health)), "min_health")


@pytest.mark.parametrize(
    ("sel", "field"),
    [
        (Selector(pool_id="a b"), "pool_id"),
        (Selector(pool_id="x" * 129), "pool_id"),
        (Selector(lang_pair=LanguagePair("en", "")), "lang_pair.tgt"),
        (Selector(lang_pair=LanguagePair("e:n", "de")), "lang_pair.src"),
        (Selector(required_services=("mt", "")), "required_services[1]"),
        (Selector(required_services=("x" * 129,)), "required_services[0]"),
        (Selector(required_services=tuple(f"s{i}" for i in range(257))), "required_services"),
        (Selector(labels={f"k{i}": "v" for i in range(65)}), "labels"),
        (Selector(labels={"": "v"}), "labels['']"),
        (Selector(exclude_node_ids=frozenset({"a-ok", "z{bad}"})), "exclude_node_ids[1]"),
        (Selector(exclude_node_ids=frozenset(f"n{i}" for i in range(2561))), "exclude_node_ids"),
    ],
)
def test_bad_selector_names_the_field(sel: Selector, field: str) -> None:
    rejects(lambda: validation.check_selector(sel), field)


def test_selector_field_prefix() -> None:
    rejects(lambda: validation.check_selector(Selector(count=0), "selector"), "selector.count")
    rejects(
        lambda: validation.check_selector(Selector(pool_id="a:b"), "selector"), "selector.pool_id"
    )


def test_selector_exclusion_list_limit_is_inclusive() -> None:
    sel = Selector(exclude_node_ids=frozenset(f"n{i}" for i in range(2560)))
    assert validation.check_selector(sel) is sel


def test_heartbeat_delay_is_not_a_reported_metric() -> None:
    # The registry computes the delay; check_metrics covers what a node reports.
    late = Metrics(heartbeat_delay=5.0)
    assert validation.check_metrics("metrics", late) is late


# --- weights -----------------------------------------------------------------------------

WEIGHT_NAMES = ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")


def test_good_weights_pass() -> None:
    w = SelectionWeights()
    assert validation.check_weights("weights", w) is w
    zero = SelectionWeights(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert validation.check_weights("weights", zero) is zero
    top = SelectionWeights(
        **dict.fromkeys(WEIGHT_NAMES, validation.MAX_WEIGHT),
        free_capacity=validation.MAX_FREE_CAPACITY_WEIGHT,
    )
    assert validation.check_weights("weights", top) is top


@pytest.mark.parametrize("name", WEIGHT_NAMES)
@pytest.mark.parametrize("bad", [math.nan, -0.01, 1000.01, math.inf, -math.inf])
def test_bad_weight_names_the_weight(name: str, bad: float) -> None:
    w = SelectionWeights(**{name: bad})
    rejects(lambda: validation.check_weights("pool.weights", w), f"pool.weights.{name}")


@pytest.mark.parametrize("bad", [math.nan, -0.5, 10.01, math.inf])
def test_bad_free_capacity_weight(bad: float) -> None:
    w = SelectionWeights(free_capacity=bad)
    rejects(lambda: validation.check_weights("weights", w), "weights.free_capacity")


# --- pools -------------------------------------------------------------------------------

GOOD_POOL = Pool(
    pool_id="pool.a",
    lang_pairs=frozenset({LanguagePair("en", "de"), LanguagePair("zh-Hans", "pt-BR")}),
    required_services=("mt",),
    labels={"zone": "eu-1"},
    min_health=0.5,
    weights=SelectionWeights(cpu=2.0, free_capacity=0.0),
)


def pool(**changes: Any) -> Pool:
    return dataclasses.replace(GOOD_POOL, **changes)


def test_good_pool_passes_unchanged() -> None:
    assert validation.check_pool(GOOD_POOL) is GOOD_POOL
    assert validation.check_pool(Pool("p")) == Pool("p")
    assert validation.check_pool(pool(min_health=1.0, weights=None))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"pool_id": ""}, "pool.pool_id"),
        ({"pool_id": "a:b"}, "pool.pool_id"),
        ({"pool_id": "x" * 129}, "pool.pool_id"),
        # Pairs are checked in (src, tgt) order, so the index is stable.
        ({"lang_pairs": frozenset({LanguagePair("en", "")})}, "pool.lang_pairs[0].tgt"),
        (
            {"lang_pairs": frozenset({LanguagePair("aa", "de"), LanguagePair("zz", "d e")})},
            "pool.lang_pairs[1].tgt",
        ),
        (
            {"lang_pairs": frozenset(LanguagePair("en", f"x{i}") for i in range(257))},
            "pool.lang_pairs",
        ),
        ({"required_services": ("mt", "")}, "pool.required_services[1]"),
        ({"required_services": ("x" * 129,)}, "pool.required_services[0]"),
        ({"required_services": tuple(f"s{i}" for i in range(257))}, "pool.required_services"),
        ({"labels": {"": "v"}}, "pool.labels['']"),
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "pool.labels"),
        ({"min_health": 1.5}, "pool.min_health"),
        ({"min_health": math.nan}, "pool.min_health"),
        ({"weights": SelectionWeights(gpu=-1.0)}, "pool.weights.gpu"),
        ({"weights": SelectionWeights(heartbeat_delay=math.nan)}, "pool.weights.heartbeat_delay"),
        ({"weights": SelectionWeights(free_capacity=11.0)}, "pool.weights.free_capacity"),
    ],
)
def test_bad_pool_names_the_field(changes: dict[str, Any], field: str) -> None:
    rejects(lambda: validation.check_pool(pool(**changes)), field)


def test_pool_field_prefix_is_configurable() -> None:
    rejects(lambda: validation.check_pool(pool(pool_id="a b"), "req.pool"), "req.pool.pool_id")


def test_pool_limits_are_inclusive() -> None:
    validation.check_pool(
        pool(
            pool_id="x" * 128,
            lang_pairs=frozenset(LanguagePair("en", f"x{i}") for i in range(256)),
            required_services=(*(f"s{i}" for i in range(255)), "n" * 128),
            labels={f"k{i}": "v" for i in range(64)},
            min_health=0.0,
        )
    )


# --- reported job ids --------------------------------------------------------------------


def test_job_ids_pass_as_a_tuple() -> None:
    assert validation.check_job_ids("running_job_ids", ["j1", "j.2"]) == ("j1", "j.2")
    assert validation.check_job_ids("running_job_ids", iter(())) == ()
    most = [f"j{i}" for i in range(validation.MAX_REPORTED_JOBS)]
    assert len(validation.check_job_ids("running_job_ids", most)) == validation.MAX_REPORTED_JOBS


@pytest.mark.parametrize(
    ("job_ids", "field"),
    [
        (["ok", ""], "running_job_ids[1]"),
        (["a:b"], "running_job_ids[0]"),
        (["ok", "ok2", "x" * 129], "running_job_ids[2]"),
        (["{tag}"], "running_job_ids[0]"),
        ([f"j{i}" for i in range(10_001)], "running_job_ids"),
    ],
)
def test_bad_job_ids_name_the_field(job_ids: list[str], field: str) -> None:
    rejects(lambda: validation.check_job_ids("running_job_ids", job_ids), field)
