"""The backpressure rule (registry/backpressure.py) with a fake queue and loop lag."""

from __future__ import annotations

import asyncio

import pytest

from registry.backpressure import Backpressure, Limits

LIMITS = Limits(queue_soft=100, queue_max=400, lag_soft_s=0.05, max_factor=4.0, hold_s=10.0)


class Rig:
    def __init__(self) -> None:
        self.queued = 0
        self.lag = 0.0
        self.stretch = 1.0
        self.bp = Backpressure(
            LIMITS,
            queued=lambda: self.queued,
            loop_lag=lambda: self.lag,
            stretch=lambda f: setattr(self, "stretch", f),
        )


def test_no_pressure_no_stretch() -> None:
    rig = Rig()
    rig.queued, rig.lag = 99, 0.049
    rig.bp.update(now=0.0)
    assert rig.bp.factor == 1.0 and rig.stretch == 1.0


def test_the_factor_rises_at_once_with_the_worse_signal_and_is_capped() -> None:
    rig = Rig()
    rig.queued, rig.lag = 250, 0.0
    rig.bp.update(now=0.0)
    assert rig.bp.factor == 2.5 and rig.stretch == 2.5
    rig.queued, rig.lag = 0, 0.15
    rig.bp.update(now=0.1)
    assert rig.bp.factor == 3.0
    rig.queued = 10_000
    rig.bp.update(now=0.2)
    assert rig.bp.factor == 4.0 and rig.stretch == 4.0


def test_the_factor_holds_then_comes_down_while_deadlines_keep_the_highest_told() -> None:
    rig = Rig()
    rig.queued = 400
    rig.bp.update(now=0.0)
    rig.queued = 0
    rig.bp.update(now=5.0)
    assert rig.bp.factor == 4.0, "held for hold_s"
    rig.bp.update(now=10.0)
    assert rig.bp.factor == 3.2, "then down by a fifth per period"
    assert rig.stretch == 4.0, "a node told 4x within hold_s must not expire"
    now = 10.0
    while rig.bp.factor > 1.0:
        now += 0.1
        rig.bp.update(now=now)
    assert rig.bp.factor == 1.0
    rig.bp.update(now=now + LIMITS.hold_s)
    assert rig.stretch == 1.0


async def test_a_full_queue_holds_readers_until_there_is_room() -> None:
    rig = Rig()
    rig.queued = 400
    waiter = asyncio.ensure_future(rig.bp.room())
    await asyncio.sleep(0.01)
    assert not waiter.done() and rig.bp.waits == 1
    rig.queued = 399
    rig.bp.update()
    await asyncio.wait_for(waiter, 1)


@pytest.mark.parametrize("queued", [0, 399])
async def test_room_is_free_below_the_bound(queued: int) -> None:
    rig = Rig()
    rig.queued = queued
    await asyncio.wait_for(rig.bp.room(), 0.1)
    assert rig.bp.waits == 0
