"""Health score: 1 when idle, 0 when saturated, never rising as any load figure rises."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.health import DEFAULT_WEIGHTS, HealthWeights, health_score
from registry.model import Metrics

NAMES = ("cpu", "gpu", "mem", "load", "error_rate")
fractions = st.floats(0.0, 1.0, allow_nan=False)
metrics = st.builds(Metrics, fractions, fractions, fractions, fractions, fractions)


def test_idle_node_scores_one() -> None:
    assert health_score(Metrics()) == 1.0


def test_saturated_node_scores_zero() -> None:
    assert health_score(Metrics(1.0, 1.0, 1.0, 1.0, 1.0)) == 0.0


def test_default_weights_sum_to_one() -> None:
    total = sum(getattr(DEFAULT_WEIGHTS, name) for name in NAMES)
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize("name", NAMES)
def test_one_saturated_metric_costs_its_weight(name: str) -> None:
    score = health_score(Metrics(**{name: 1.0}))
    assert score == pytest.approx(1.0 - getattr(DEFAULT_WEIGHTS, name), abs=1e-4)


def test_weighted_mean_example() -> None:
    m = Metrics(cpu=0.5, gpu=0.0, mem=0.5, load=1.0, error_rate=0.1)
    # 0.25*0.5 + 0.2*0.5 + 0.15*1.0 + 0.25*0.1 = 0.4
    assert health_score(m) == 0.6


def test_weights_are_relative() -> None:
    m = Metrics(cpu=0.3, gpu=0.6, mem=0.1, load=0.9, error_rate=0.2)
    doubled = HealthWeights(**{n: 2 * getattr(DEFAULT_WEIGHTS, n) for n in NAMES})
    assert health_score(m, doubled) == health_score(m)
    only_cpu = HealthWeights(cpu=3.0, gpu=0.0, mem=0.0, load=0.0, error_rate=0.0)
    assert health_score(m, only_cpu) == 0.7


def test_zero_weights_score_one() -> None:
    zero = HealthWeights(0.0, 0.0, 0.0, 0.0, 0.0)
    assert health_score(Metrics(1.0, 1.0, 1.0, 1.0, 1.0), zero) == 1.0


def test_score_is_rounded_to_four_places() -> None:
    assert health_score(Metrics(cpu=1 / 3)) == round(1 - 0.25 / 3, 4)


@given(metrics)
def test_score_is_within_zero_and_one(m: Metrics) -> None:
    assert 0.0 <= health_score(m) <= 1.0


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
