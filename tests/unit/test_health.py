"""Health score: 1 when idle, 0 when saturated, never rising as any load figure rises."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.health import health_column, health_score
from registry.model import DEFAULT_WEIGHTS, Metrics, SelectionWeights

NAMES = ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")
fractions = st.floats(0.0, 1.0, allow_nan=False)
metrics = st.builds(
    Metrics,
    cpu=fractions,
    gpu=fractions,
    mem=fractions,
    load=fractions,
    error_rate=fractions,
    heartbeat_delay=fractions,
)
weights = st.builds(
    SelectionWeights,
    **{name: st.floats(0.0, 1000.0, allow_nan=False) for name in NAMES},
)
SATURATED = Metrics(**dict.fromkeys(NAMES, 1.0))


def row(m: Metrics) -> list[float]:
    return [getattr(m, name) for name in NAMES]


def by_hand(m: Metrics, w: SelectionWeights = DEFAULT_WEIGHTS) -> float:
    """The formula of docs/scheduling.md, term by term, without rounding."""
    total = w.cpu + w.gpu + w.mem + w.load + w.heartbeat_delay + w.error_rate
    used = (
        w.cpu * m.cpu
        + w.gpu * m.gpu
        + w.mem * m.mem
        + w.load * m.load
        + w.heartbeat_delay * m.heartbeat_delay
        + w.error_rate * m.error_rate
    )
    return 1.0 - used / total


def lua_health(m: Metrics, w: SelectionWeights = DEFAULT_WEIGHTS) -> float:
    """health_of() in registry/gateway/scripts/heartbeat.lua, transcribed."""
    ws = w.health_vector()
    wsum = ws[0] + ws[1] + ws[2] + ws[3] + ws[4] + ws[5]
    if wsum <= 0:
        return 1.0
    used = 0.0
    for wj, mj in zip(ws, row(m), strict=True):
        used = used + wj * mj
    h = min(max(1 - used / wsum, 0.0), 1.0)
    return math.floor(h * 10000 + 0.5) / 10000


def test_idle_node_scores_one() -> None:
    assert health_score(Metrics()) == 1.0


def test_saturated_node_scores_zero() -> None:
    assert health_score(SATURATED) == 0.0
    # Five of six saturated is not enough: the delay still counts.
    assert health_score(dataclasses.replace(SATURATED, heartbeat_delay=0.0)) == 0.1


def test_default_weights() -> None:
    assert DEFAULT_WEIGHTS == SelectionWeights()
    assert DEFAULT_WEIGHTS.health_vector() == (0.2, 0.15, 0.15, 0.15, 0.1, 0.25)
    assert sum(DEFAULT_WEIGHTS.health_vector()) == pytest.approx(1.0)
    assert DEFAULT_WEIGHTS.free_capacity == 1.0


def test_health_vector_is_in_metric_column_order() -> None:
    w = SelectionWeights(1, 2, 3, 4, 5, 6, 7)
    assert w.health_vector() == (w.cpu, w.gpu, w.mem, w.load, w.heartbeat_delay, w.error_rate)


@pytest.mark.parametrize("name", NAMES)
def test_one_saturated_metric_costs_its_weight(name: str) -> None:
    score = health_score(Metrics(**{name: 1.0}))
    assert score == pytest.approx(1.0 - getattr(DEFAULT_WEIGHTS, name), abs=1e-4)


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        # 0.2*0.5 + 0.15*0.5 + 0.15*1.0 + 0.25*0.1 = 0.35
        (Metrics(cpu=0.5, gpu=0.0, mem=0.5, load=1.0, error_rate=0.1), 0.65),
        # the same plus a full interval late: + 0.1*1.0
        (Metrics(cpu=0.5, mem=0.5, load=1.0, error_rate=0.1, heartbeat_delay=1.0), 0.55),
        # 0.1*0.5 = 0.05
        (Metrics(heartbeat_delay=0.5), 0.95),
        # 0.2*0.3 + 0.15*0.3*3 + 0.1*0.3 = 0.225
        (Metrics(0.3, 0.3, 0.3, 0.3, 0.0, 0.3), 0.775),
        # 0.2*0.1 + 0.15*0.2 + 0.15*0.3 + 0.15*0.4 + 0.1*0.25 + 0.25*0.05 = 0.1925
        (
            Metrics(cpu=0.1, gpu=0.2, mem=0.3, load=0.4, error_rate=0.05, heartbeat_delay=0.25),
            0.8075,
        ),
        # 0.2*0.123 + 0.15*0.456 + 0.1*0.789 = 0.1719 (exactly 0.8281 after rounding)
        (Metrics(cpu=0.123, gpu=0.456, heartbeat_delay=0.789), 0.8281),
        # 0.25*(1/3) = 0.083333..: rounds to 0.9167
        (Metrics(error_rate=1 / 3), 0.9167),
    ],
)
def test_hand_computed_examples(m: Metrics, expected: float) -> None:
    assert by_hand(m) == pytest.approx(expected, abs=5e-5)
    assert health_score(m) == expected
    assert lua_health(m) == expected, "the heartbeat script stores the same number"


def test_weights_are_relative() -> None:
    m = Metrics(cpu=0.3, gpu=0.6, mem=0.1, load=0.9, error_rate=0.2, heartbeat_delay=0.4)
    doubled = SelectionWeights(**{n: 2 * getattr(DEFAULT_WEIGHTS, n) for n in NAMES})
    assert health_score(m, doubled) == health_score(m)
    only_cpu = SelectionWeights(
        cpu=3.0, gpu=0.0, mem=0.0, load=0.0, heartbeat_delay=0.0, error_rate=0.0
    )
    assert health_score(m, only_cpu) == 0.7
    only_delay = SelectionWeights(0.0, 0.0, 0.0, 0.0, heartbeat_delay=5.0, error_rate=0.0)
    assert health_score(m, only_delay) == 0.6


def test_free_capacity_weight_does_not_enter_health() -> None:
    m = Metrics(cpu=0.3, heartbeat_delay=0.7)
    assert health_score(m, SelectionWeights(free_capacity=0.0)) == health_score(m)
    assert health_score(m, SelectionWeights(free_capacity=10.0)) == health_score(m)


def test_zero_weights_score_one() -> None:
    zero = SelectionWeights(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert health_score(SATURATED, zero) == 1.0
    assert list(health_column(np.array([row(SATURATED)] * 3), zero)) == [1.0, 1.0, 1.0]


def test_score_is_rounded_to_four_places() -> None:
    assert health_score(Metrics(cpu=1 / 3)) == round(1 - 0.2 / 3, 4) == 0.9333
    assert health_score(Metrics(heartbeat_delay=1 / 7)) == round(1 - 0.1 / 7, 4) == 0.9857


def test_rounding_matches_the_heartbeat_script_at_a_half() -> None:
    m = Metrics(gpu=0.005)  # 1 - 0.15*0.005 = 0.99925
    assert lua_health(m) == 0.9993
    assert health_score(m) == lua_health(m)


@given(metrics)
def test_score_is_within_zero_and_one_and_has_four_places(m: Metrics) -> None:
    score = health_score(m)
    assert 0.0 <= score <= 1.0
    assert score == round(score, 4)
    assert score == pytest.approx(by_hand(m), abs=5e-5 + 1e-12)
    assert score == pytest.approx(lua_health(m), abs=1e-4 + 1e-12)


@given(st.lists(metrics, min_size=1, max_size=8), weights)
def test_health_column_is_the_unrounded_score(ms: list[Metrics], w: SelectionWeights) -> None:
    column = health_column(np.array([row(m) for m in ms]), w)
    assert column.shape == (len(ms),)
    for m, value in zip(ms, column, strict=True):
        assert 0.0 <= value <= 1.0
        assert health_score(m, w) == pytest.approx(float(value), abs=5e-5 + 1e-9)


@given(metrics, st.sampled_from(NAMES), fractions)
def test_score_never_rises_as_a_metric_rises(m: Metrics, name: str, other: float) -> None:
    low, high = sorted((getattr(m, name), other))
    less = dataclasses.replace(m, **{name: low})
    more = dataclasses.replace(m, **{name: high})
    assert health_score(more) <= health_score(less)


@given(metrics, st.sampled_from(NAMES))
def test_a_large_rise_strictly_lowers_the_score(m: Metrics, name: str) -> None:
    base = dataclasses.replace(m, **{name: 0.0})
    worse = dataclasses.replace(m, **{name: 1.0})
    assert health_score(worse) < health_score(base)
