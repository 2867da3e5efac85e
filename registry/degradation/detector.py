"""The failure detector: tells a Redis that is down from one that is busy.

A thread of its own PINGs Redis every ``interval`` on a connection of its own and polls
the socket while the answer is outstanding. Two signals make Redis "down":

- **A definitive error**: the connection is refused, reset or closed (kill -9, a
  restart, a network that rejects). Reported at once: nothing busy looks like this.
- **Silence**: the outstanding PING is older than the suspicion threshold *and* nothing
  at all came back from Redis in that time, on any connection of the sidecar (the
  gateway tells when its calls last got an answer). A frozen Redis (SIGSTOP, a script
  that never ends) sends nothing; a busy one keeps answering, late.

The threshold adapts to what Redis's answers have looked like lately, the way a
phi-accrual detector (Cassandra, Akka) does: the PING round trips of the last few seconds
give a mean and a standard deviation, and a PING is suspect once it is ``z`` deviations
past the mean (z = 5.6 is phi = 8 for a normal distribution) and ``tail`` times the
typical worst of them (the median of the slowest round trip of each 6 s of the last
minute: a loaded machine's round trips are heavy-tailed, a Redis waiting for a CPU now
and then, which a normal fit underestimates). The host's CPU pressure (Linux PSI) raises
the floor: a Redis on a contended host goes unscheduled for tens of milliseconds. On a
quiet machine round trips are a fraction of a millisecond, so the floor decides (a frozen
Redis is found within the floor); on a saturated machine the threshold grows with the
load, up to the ceiling. A round trip that took longer than the threshold in force, while
nothing else answered either, is not learned as load (an outage would make the threshold
useless); but when that answer came back within the ceiling, Redis was slow rather than
gone, so for the next ``late_memory_s`` the threshold is at least twice that round trip:
a Redis slowed down for good (a slow link, a loaded host) trips the sidecar once, not at
every PING. Before it calls a silence, it reads the socket once more (the answer may be
there, unread: a garbage collection held every thread) and waits for a stalled event loop
to look at its own connections.

Why a thread: a timer on the event loop measures the loop's queue as well as Redis, and
a loaded loop made healthy 6 ms answers look like 25 ms timeouts. The thread waits on
the socket with the GIL released.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

POLL_S = 0.001
"""Shortest wait between two checks of an outstanding PING."""
MAX_WAIT_S = 0.05
"""Longest wait between two checks (bounds how long ``stop`` takes)."""
STALL_S = 0.02
"""A gap this long between two polls means this thread did not run (a GC pause of the
process, no CPU for it): the round trip it then measures is not Redis's."""


class Probe(Protocol):
    """One connection to Redis that the detector drives by hand (see Gateway.probe)."""

    def send(self) -> None:
        """Send a PING; connects first when needed (may raise)."""

    def ready(self, timeout: float) -> bool:
        """True once the answer can be read; raises when the connection is closed."""

    def read(self) -> None:
        """Read the answer (raises on an error reply or a closed connection)."""

    def reset(self) -> None:
        """Drop the connection; the next ``send`` opens a new one."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    floor_s: float = 0.04
    """Silence shorter than this is never an outage (decides on a quiet machine)."""
    ceiling_s: float = 1.0
    """Silence this long is always an outage, however noisy the recent past was."""
    z: float = 5.6
    """Deviations past the mean round trip before a PING is suspect (phi ~ 8)."""
    tail: float = 2.0
    """...and at least this many times the typical worst round trip of the last minute."""
    peak_memory_s: float = 60.0
    min_std_s: float = 0.002
    """Lower bound of the deviation, so a very steady past does not make a hair trigger."""
    window: int = 1000
    """Round trips remembered (about ten seconds at the default interval)."""
    late_memory_s: float = 10.0
    """How long a late answer (one that came after a trip) keeps the threshold up."""


class RoundTrips:
    """Recent PING round trips and the suspicion threshold they imply."""

    def __init__(self, t: Thresholds) -> None:
        self._t = t
        self._samples: deque[float] = deque(maxlen=t.window)
        self._sum = 0.0
        self._sq = 0.0
        self._base = t.floor_s
        self.pressure = 0.0
        """The host's CPU pressure (share of the last 10 s some task waited for a CPU,
        Linux PSI); set by the detector. A Redis on a contended host goes unscheduled for
        tens of milliseconds now and then: the floor rises with it (x3 at full pressure)."""
        self._peaks: deque[tuple[float, float]] = deque()
        self._late_s = 0.0
        self._late_until = 0.0

    @property
    def threshold_s(self) -> float:
        base = min(max(self._base, self._t.floor_s * (1 + 2 * self.pressure)), self._t.ceiling_s)
        if self._late_s and time.monotonic() < self._late_until:
            return max(base, self._late_s)
        return base

    def late(self, rtt: float) -> None:
        """An answer that came after the detector had called Redis down."""
        if rtt >= self._t.ceiling_s:
            return
        now = time.monotonic()
        current = self._late_s if now < self._late_until else 0.0
        self._late_s = min(max(current, 2 * rtt), self._t.ceiling_s)
        self._late_until = now + self._t.late_memory_s

    def add(self, rtt: float) -> None:
        if len(self._samples) == self._samples.maxlen:
            evicted = self._samples[0]
            self._sum -= evicted
            self._sq -= evicted * evicted
        self._samples.append(rtt)
        self._sum += rtt
        self._sq += rtt * rtt
        n = len(self._samples)
        mean = self._sum / n
        std = math.sqrt(max(self._sq / n - mean * mean, 0.0))
        t = self._t
        # Round trips on a loaded machine are heavy-tailed (a Redis that waits for a CPU),
        # which a normal fit underestimates: the slowest of the last minute counts too.
        suspect = max(mean + t.z * max(std, t.min_std_s), t.tail * self._peak(rtt))
        self._base = min(max(suspect, t.floor_s), t.ceiling_s)

    def _peak(self, rtt: float) -> float:
        """The typical worst round trip: the slowest of each tenth of the last
        ``peak_memory_s``, median of those. A loaded machine shows it in most tenths; one
        odd stall (a start-up burst) in one tenth does not slow detection for a minute."""
        now = time.monotonic()
        span = self._t.peak_memory_s / 10
        if not self._peaks or now - self._peaks[-1][0] >= span:
            self._peaks.append((now, rtt))
            while now - self._peaks[0][0] > self._t.peak_memory_s:
                self._peaks.popleft()
        elif rtt > self._peaks[-1][1]:
            self._peaks[-1] = (self._peaks[-1][0], rtt)
        peaks = sorted(p for _, p in self._peaks)
        return peaks[len(peaks) // 2]


class Detector:
    """Runs the probe loop in a thread; calls ``on_down(why)`` from that thread.

    ``heard`` returns the monotonic time at which the sidecar last got any answer from
    Redis (its other connections): evidence of life that vetoes a trip for silence.
    ``loop_behind`` says how long ago the event loop last ran: while it is stalled, the
    answers it has not read yet are unknown, and the verdict waits.
    """

    def __init__(
        self,
        probe: Callable[[], Probe],
        *,
        interval_s: float,
        thresholds: Thresholds,
        on_down: Callable[[str], object],
        heard: Callable[[], float],
        loop_behind: Callable[[], float] = lambda: 0.0,
        pressure: Callable[[], float] | None = None,
    ) -> None:
        self._make_probe = probe
        self._interval = interval_s
        self.trips = RoundTrips(thresholds)
        self._on_down = on_down
        self._heard = heard
        self._loop_behind = loop_behind
        self._pressure = pressure or cpu_pressure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-detector", daemon=True)
        self.checks = 0
        self.outstanding_since: float | None = None
        """When the PING in flight was sent (None: none in flight). Read by ``suspect``."""
        self.last_answer = time.monotonic()
        self.silences = 0
        """Trips for silence (a frozen Redis)."""
        self.errors = 0
        """Trips for a refused, reset or closed connection."""
        self.vetoed = 0
        """PINGs past the threshold while other connections were still answered (busy)."""
        self.stalls = 0
        """Round trips not learned because this thread itself did not run meanwhile."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def threshold_s(self) -> float:
        return self.trips.threshold_s

    def suspect(self) -> bool:
        """The PING in flight is past the threshold: reads may say they are not fresh."""
        since = self.outstanding_since
        return since is not None and time.monotonic() - since > self.trips.threshold_s

    def _run(self) -> None:
        probe = self._make_probe()
        failing = False
        pressure_at = 0.0
        while not self._stop.is_set():
            self.checks += 1
            if time.monotonic() - pressure_at >= 1.0:
                pressure_at = time.monotonic()
                self.trips.pressure = self._pressure()
            try:
                self._ping(probe)
            except Exception as exc:  # refused, reset, closed: definitive
                probe.reset()
                self.outstanding_since = None
                if not failing:
                    self.errors += 1
                    self._on_down(f"Redis connection failed: {type(exc).__name__}: {exc}")
                failing = True
            else:
                failing = False
            self._stop.wait(self._interval)

    def _ping(self, probe: Probe) -> None:
        """One PING: wait for its answer, judging Redis each time the silence could have
        passed the threshold (one wake-up per check, not a busy poll)."""
        sent = last = time.monotonic()
        self.outstanding_since = sent
        probe.send()
        tripped = vetoed = stalled = False
        # Silence counts from the last answer heard, not from this PING: the first
        # check is due when that silence would reach the threshold.
        heard = max(self._heard(), self.last_answer)
        wait = min(max(heard + self.trips.threshold_s - sent, POLL_S), MAX_WAIT_S)
        while not probe.ready(wait):
            if self._stop.is_set():
                return
            now = time.monotonic()
            stalled = stalled or now - last > wait + STALL_S
            last = now
            if tripped:
                wait = MAX_WAIT_S
                continue
            threshold = self.trips.threshold_s
            heard = max(self._heard(), self.last_answer)
            silent = now - heard
            if silent <= threshold:
                if now - sent > threshold and not vetoed:
                    vetoed = True  # our PING is late, but Redis answers elsewhere: busy
                    self.vetoed += 1
                wait = min(max(heard + threshold - now, POLL_S), MAX_WAIT_S)
                continue
            if probe.ready(0):
                # The answer is there: this thread (or the whole process: a GC pause,
                # a CPU it did not get) was late to look, Redis was not.
                break
            if self._loop_behind() > STALL_S:
                # The event loop has not run lately: answers may wait unread on its
                # connections, so its silence proves nothing yet. Judge once it ran.
                wait = STALL_S
                continue
            tripped = True
            self.silences += 1
            wait = MAX_WAIT_S
            self._on_down(
                f"Redis silent for {1000 * silent:.0f} ms (threshold "
                f"{1000 * threshold:.0f} ms; nothing answered on any connection)"
            )
        probe.read()
        now = time.monotonic()
        self.outstanding_since = None
        self.last_answer = now
        if tripped:  # an outage's round trip says nothing about load
            self.trips.late(now - sent)
        elif not stalled:  # nor one this thread could not time (it did not run)
            self.trips.add(now - sent)
        else:
            self.stalls += 1


PSI_CPU = "/proc/pressure/cpu"


def cpu_pressure() -> float:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a
    CPU (0 when the kernel does not say)."""
    try:
        with open(PSI_CPU) as f:
            first = f.readline()  # "some avg10=24.79 avg60=35.27 avg300=32.88 total=..."
        return min(float(first.split()[1].partition("=")[2]) / 100, 1.0)
    except (OSError, ValueError, IndexError):
        return 0.0
