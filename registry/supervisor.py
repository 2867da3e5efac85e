"""Every long-running background part of the sidecar runs under one supervisor.

A loop that dies must neither take the process down silently nor vanish silently: each
failure is logged with its traceback, counted and followed by a restart with jittered
backoff. A part that keeps failing turns the sidecar unhealthy (gRPC health NOT_SERVING
through ``on_health``) while it goes on being restarted; a quiet window turns it healthy
again. Shaped after temporalio's ``Worker._run``, which keeps its parts under one
``asyncio.wait``, but restarting rather than stopping on the first error: the sidecar must
outlive a bug in one loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from tenacity import AsyncRetrying, RetryCallState, wait_exponential_jitter

log = logging.getLogger(__name__)

HealthCallback = Callable[[bool], Awaitable[None] | None]


class PartReturned(Exception):
    """A part meant to run until cancelled returned: as bad as a crash, and restarted."""


@dataclass(frozen=True)
class PartState:
    """One part as GetStatus and the metrics report it."""

    name: str
    running: bool
    """The part's coroutine is running now (not finished, not waiting to restart)."""
    failures: int
    restarts: int
    last_error: str
    """``Type: message`` of the latest failure; empty if it never failed."""


@dataclass
class _Part:
    name: str
    factory: Callable[[], Awaitable[None]]
    forever: bool
    task: asyncio.Task[None] | None = None
    running: bool = False
    streak: int = 0
    """Failures since the part last ran ``reset_after_s`` without failing: the backoff step."""
    recent: deque[float] = field(default_factory=deque)
    """Loop times of the failures within the last ``window_s``."""
    last_failure: float | None = None
    last_error: str = ""
    tripped: bool = False


class Supervisor:
    """Runs parts, restarts the ones that fail and reports health. ``async with`` it."""

    def __init__(
        self,
        on_health: HealthCallback | None = None,
        *,
        restart_initial_s: float = 0.1,
        restart_max_s: float = 5.0,
        give_up_after: int = 5,
        window_s: float = 60.0,
        reset_after_s: float | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        """``give_up_after`` failures of one part within ``window_s`` make the supervisor
        unhealthy; ``window_s`` without any failure makes it healthy again. The backoff
        starts over once a part ran ``reset_after_s`` (default ``window_s``) unharmed."""
        if give_up_after < 1 or window_s <= 0 or restart_initial_s < 0:
            raise ValueError("give_up_after >= 1, window_s > 0, restart_initial_s >= 0")
        self._on_health = on_health
        self._give_up_after = give_up_after
        self._window_s = window_s
        self._reset_after_s = window_s if reset_after_s is None else reset_after_s
        self._close_timeout_s = close_timeout_s
        # Only the owner of the wait strategy: tenacity computes every delay, and jitter
        # keeps sidecars that crashed together from restarting together.
        self._retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=restart_initial_s, max=restart_max_s, jitter=restart_initial_s
            )
        )
        self._parts: dict[str, _Part] = {}
        self._healthy = True
        self._watcher: asyncio.Task[None] | None = None
        self._notifications: set[asyncio.Task[None]] = set()
        self._health_lock = asyncio.Lock()
        self._closing = False
        self.failures: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def unhealthy_parts(self) -> list[str]:
        """Parts that failed ``give_up_after`` times in a window and were not quiet since."""
        return sorted(p.name for p in self._parts.values() if p.tripped)

    def snapshot(self) -> list[PartState]:
        return [
            PartState(
                name=p.name,
                running=p.running,
                failures=self.failures[p.name],
                restarts=self.restarts[p.name],
                last_error=p.last_error,
            )
            for p in self._parts.values()
        ]

    def spawn(
        self, name: str, factory: Callable[[], Awaitable[None]], *, forever: bool = True
    ) -> None:
        """Start ``factory()`` now and again after each failure.

        ``forever``: the part should run until cancelled, so returning is a failure too;
        with ``forever=False`` a normal return finishes the part.
        """
        if self._closing:
            raise RuntimeError("supervisor is closed")
        old = self._parts.get(name)
        if old is not None and old.task is not None and not old.task.done():
            raise ValueError(f"part {name!r} is already running")
        part = _Part(name, factory, forever)
        self._parts[name] = part
        part.task = asyncio.create_task(self._supervise(part), name=f"supervisor:{name}")

    async def stop(self, name: str) -> None:
        """Stop one part for good: it is cancelled and not restarted."""
        part = self._parts.pop(name, None)
        if part is not None and part.task is not None:
            part.task.cancel()
            await asyncio.gather(part.task, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel every part and wait, bounded; raises nothing.

        Failures were logged as they happened, so nothing is lost by not raising here.
        """
        self._closing = True
        tasks = [p.task for p in self._parts.values() if p.task is not None]
        tasks += [t for t in (self._watcher, *self._notifications) if t is not None]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=self._close_timeout_s)
        if pending:
            log.error(
                "supervisor: %s did not stop within %.1f s; going on",
                ", ".join(sorted(t.get_name() for t in pending)),
                self._close_timeout_s,
            )
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                # Only a bug in the supervisor itself gets here: never swallowed either.
                log.error("supervisor: %s failed", task.get_name(), exc_info=task.exception())

    async def _supervise(self, part: _Part) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            started = loop.time()
            part.running = True
            try:
                await part.factory()
                if not part.forever or self._closing:  # closing: it swallowed the cancel
                    return
                raise PartReturned(f"{part.name} returned; it should run until cancelled")
            except asyncio.CancelledError:
                if self._closing or (me is not None and me.cancelling()):
                    raise
                # Raised inside the part, not a request to stop it: not a failure, but a
                # part meant to run forever must not stay dead.
                if not part.forever:
                    log.warning("part %s ended with CancelledError", part.name)
                    return
                log.warning("part %s ended with CancelledError; restarting", part.name)
                delay = self._backoff(part, loop.time() - started)
            except Exception as exc:
                if self._closing:
                    log.error("part %s failed while stopping", part.name, exc_info=exc)
                    return
                delay = self._failed(part, exc, loop.time() - started)
            finally:
                part.running = False
            await asyncio.sleep(delay)
            self.restarts[part.name] += 1

    def _backoff(self, part: _Part, ran_s: float) -> float:
        if ran_s >= self._reset_after_s:
            part.streak = 0
        part.streak += 1
        state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = part.streak
        return float(self._retrying.wait(state))

    def _failed(self, part: _Part, exc: Exception, ran_s: float) -> float:
        now = asyncio.get_running_loop().time()
        self.failures[part.name] += 1
        part.last_failure = now
        part.last_error = f"{type(exc).__name__}: {exc}"
        part.recent.append(now)
        while part.recent and part.recent[0] <= now - self._window_s:
            part.recent.popleft()
        delay = self._backoff(part, ran_s)
        if isinstance(exc, PartReturned):
            log.error("part %s returned unexpectedly; restarting in %.2f s", part.name, delay)
        else:
            log.error(
                "part %s failed (%d in the last %.0f s); restarting in %.2f s",
                part.name,
                len(part.recent),
                self._window_s,
                delay,
                exc_info=exc,
            )
        if len(part.recent) >= self._give_up_after and not part.tripped:
            part.tripped = True
            log.error(
                "part %s failed %d times within %.0f s: unhealthy until %.0f s pass "
                "without a failure",
                part.name,
                len(part.recent),
                self._window_s,
                self._window_s,
            )
            if self._healthy:
                self._set_healthy(False)
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._recover(), name="supervisor:health")
        return delay

    async def _recover(self) -> None:
        """Healthy again once no part failed for a whole window."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for part in self._parts.values():
                if part.last_failure is not None and now - part.last_failure >= self._window_s:
                    part.tripped = False
            last = max(
                (p.last_failure for p in self._parts.values() if p.last_failure is not None),
                default=now - self._window_s,
            )
            quiet_at = last + self._window_s
            if now >= quiet_at:
                break
            await asyncio.sleep(quiet_at - now)
        # Synchronously with the flip, so a failure from now on starts a new watcher.
        self._watcher = None
        log.info("supervisor: no part failed for %.0f s: healthy again", self._window_s)
        self._set_healthy(True)

    def _set_healthy(self, healthy: bool) -> None:
        self._healthy = healthy
        if self._on_health is None:
            return
        # A task, so a slow callback never holds a part back; the lock keeps the calls
        # in the order of the flips.
        task = asyncio.create_task(self._notify(healthy), name="supervisor:on_health")
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _notify(self, healthy: bool) -> None:
        assert self._on_health is not None
        async with self._health_lock:
            try:
                result = self._on_health(healthy)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.error("supervisor: on_health(%s) failed", healthy, exc_info=exc)
