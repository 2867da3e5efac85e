"""The supervisor: failures are logged, counted and restarted with backoff; health flips
after repeated failures and back after a quiet window; closing leaves nothing running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from registry.supervisor import Supervisor

# Tiny values: the whole module runs in well under a second.
FAST = {"restart_initial_s": 0.01, "restart_max_s": 0.02}


async def eventually(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The backoff each failure announced ("... restarting in %.2f s", delay last)."""
    return [
        float(r.args[-1])  # type: ignore[index]
        for r in caplog.records
        if r.name == "registry.supervisor" and "restarting in" in r.msg
    ]


async def forever() -> None:
    await asyncio.Event().wait()


async def test_failure_is_logged_with_traceback_counted_and_restarted_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(loop.time())
        if len(starts) <= 2:
            raise RuntimeError(f"boom {len(starts)}")
        await forever()

    async with Supervisor(restart_initial_s=0.02, restart_max_s=1.0) as sup:
        sup.spawn("flaky", flaky)
        await eventually(lambda: len(starts) == 3)
        assert sup.failures["flaky"] == 2
        assert sup.restarts["flaky"] == 2
        [state] = sup.snapshot()
        assert state.running and state.failures == 2 and state.restarts == 2
        assert state.last_error == "RuntimeError: boom 2"
        assert sup.healthy

    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(errors) == 2
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)
    assert "boom 1" in caplog.text and "Traceback" in caplog.text
    # Exponential with jitter (tenacity): attempt n waits 0.02 * 2**(n-1) + U(0, 0.02).
    first, second = restart_delays(caplog)
    assert 0.02 <= first <= 0.04 and 0.04 <= second <= 0.06
    assert starts[1] - starts[0] >= 0.019 and starts[2] - starts[1] >= 0.039


async def test_backoff_starts_over_after_the_part_ran_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def part() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            await asyncio.sleep(0.04)  # longer than reset_after_s
        if calls <= 3:
            raise RuntimeError("boom")
        await forever()

    async with Supervisor(
        restart_initial_s=0.01, restart_max_s=1.0, reset_after_s=0.03, window_s=10
    ) as sup:
        sup.spawn("p", part)
        await eventually(lambda: calls == 4)
    assert restart_delays(caplog)[1] >= 0.02, "second quick failure backs off further"
    assert restart_delays(caplog)[2] <= 0.02, "a failure after a long run starts over"


async def test_a_forever_part_that_returns_is_a_failure_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def returns_once() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await forever()

    async with Supervisor(**FAST) as sup:
        sup.spawn("loop", returns_once)
        await eventually(lambda: calls == 2)
        assert sup.failures["loop"] == 1 and sup.restarts["loop"] == 1
        assert "returned" in sup.snapshot()[0].last_error
    assert any(r.levelno == logging.ERROR and "returned" in r.getMessage() for r in caplog.records)


async def test_a_part_not_meant_to_run_forever_finishes() -> None:
    done = asyncio.Event()

    async def once() -> None:
        done.set()

    async with Supervisor(**FAST) as sup:
        sup.spawn("once", once, forever=False)
        await done.wait()
        await asyncio.sleep(0.05)
        [state] = sup.snapshot()
        assert not state.running and state.failures == 0 and state.restarts == 0


@pytest.mark.parametrize("callback_kind", ["sync", "async"])
async def test_repeated_failures_flip_health_and_a_quiet_window_restores_it(
    callback_kind: str,
) -> None:
    events: list[bool] = []
    calls = 0

    def on_health_sync(healthy: bool) -> None:
        events.append(healthy)

    async def on_health_async(healthy: bool) -> None:
        await asyncio.sleep(0)
        events.append(healthy)

    async def failing_five_times() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise RuntimeError("down")
        await forever()

    other_calls = 0

    async def failing_three_times() -> None:
        nonlocal other_calls
        other_calls += 1
        if other_calls <= 3:
            raise RuntimeError("down too")
        await forever()

    on_health = on_health_sync if callback_kind == "sync" else on_health_async
    async with Supervisor(on_health, give_up_after=3, window_s=0.15, **FAST) as sup:
        sup.spawn("steady", forever)
        sup.spawn("bad", failing_five_times)
        sup.spawn("also bad", failing_three_times)
        await eventually(lambda: events == [False])
        assert not sup.healthy
        # Still restarted while unhealthy; NOT_SERVING is reported once, not per failure
        # nor per part.
        await eventually(lambda: calls == 6 and other_calls == 4)
        assert sup.unhealthy_parts() == ["also bad", "bad"]
        assert sup.failures["bad"] == 5 and events == [False]
        assert not sup.healthy
        await eventually(lambda: events == [False, True])
        assert sup.healthy and sup.unhealthy_parts() == []
        assert sup.failures["steady"] == 0


async def test_health_flips_again_on_a_second_burst() -> None:
    events: list[bool] = []
    burst = asyncio.Event()
    calls = 0

    async def part() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            await burst.wait()
        if calls <= 4:
            raise RuntimeError("down")
        await forever()

    async with Supervisor(events.append, give_up_after=2, window_s=0.1, **FAST) as sup:
        sup.spawn("p", part)
        await eventually(lambda: events == [False, True])
        burst.set()
        await eventually(lambda: events == [False, True, False])
        await eventually(lambda: events == [False, True, False, True])


async def test_failures_outside_the_window_do_not_add_up() -> None:
    events: list[bool] = []

    async def slow_failure() -> None:
        await asyncio.sleep(0.04)
        raise RuntimeError("now and then")

    async with Supervisor(events.append, give_up_after=2, window_s=0.03, **FAST) as sup:
        sup.spawn("p", slow_failure)
        await eventually(lambda: sup.failures["p"] >= 2)
        assert events == [] and sup.healthy


async def test_aclose_cancels_every_part_and_leaves_no_task_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cleaned: list[str] = []
    started = asyncio.Event()

    async def tidy() -> None:
        try:
            started.set()
            await forever()
        finally:
            cleaned.append("tidy")

    async def always_failing() -> None:
        raise RuntimeError("earlier failure")

    sup = Supervisor(lambda healthy: None, give_up_after=1, window_s=10, **FAST)
    sup.spawn("tidy", tidy)
    sup.spawn("failing", always_failing)  # mostly sleeping in its backoff
    await started.wait()
    await eventually(lambda: sup.failures["failing"] >= 2)
    await sup.aclose()  # raises nothing, though a part failed

    assert cleaned == ["tidy"]
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not any(state.running for state in sup.snapshot())
    assert sup.failures["tidy"] == 0, "cancellation is not a failure"
    assert "earlier failure" in caplog.text, "the failure was logged when it happened"
    with pytest.raises(RuntimeError):
        sup.spawn("late", forever)


async def test_a_part_failing_while_it_stops_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    async def messy() -> None:
        try:
            started.set()
            await forever()
        finally:
            raise OSError("cleanup failed")

    async with Supervisor(**FAST) as sup:
        sup.spawn("messy", messy)
        await started.wait()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert any(
        r.levelno == logging.ERROR and r.exc_info and "cleanup failed" in str(r.exc_info[1])
        for r in caplog.records
    )


async def test_cancelled_error_raised_inside_a_part_is_no_failure_but_restarts_it() -> None:
    calls = 0

    async def cancelled_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        await forever()

    async with Supervisor(**FAST) as sup:
        sup.spawn("p", cancelled_once)
        await eventually(lambda: calls == 2)
        assert sup.failures["p"] == 0 and sup.restarts["p"] == 1
        assert sup.healthy


async def test_spawning_a_running_name_twice_is_refused() -> None:
    async with Supervisor(**FAST) as sup:
        sup.spawn("p", forever)
        with pytest.raises(ValueError, match="already running"):
            sup.spawn("p", forever)
