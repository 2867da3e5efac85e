"""Settings: the one place configuration is read, from flags and environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from registry.model import SelectionWeights

ENV_PREFIX = "REGISTRY_"
EXPORTERS = ("", "otlp", "console")
HEALTH_WEIGHT_NAMES = ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate")


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar can be told. Each field maps to ``--flag`` and ``REGISTRY_FLAG``."""

    listen: str = "127.0.0.1:50051"
    """gRPC listen address; loopback by default so nothing is exposed by accident."""
    redis_url: str | None = None
    """Redis to use (redis://, rediss://, unix://). None starts an embedded redis-server."""
    namespace: str = "reg"
    """Prefix and hash tag of every key, so several registries can share one Redis."""
    data_dir: Path = Path(".registry-data")
    """Where the embedded redis-server keeps its socket and append-only file, and the sidecar
    the journal of its write buffer (one sidecar per directory: it is locked)."""
    redis_server_bin: str = "redis-server"
    """Executable for the embedded Redis."""
    default_ttl_ms: int = 10_000
    """Liveness TTL for nodes that register without one."""
    min_ttl_ms: int = 500
    """Smallest TTL a node may ask for; shorter would turn jitter into churn."""
    max_ttl_ms: int = 3_600_000
    """Largest TTL a node may ask for."""
    offline_grace_ms: int = 60_000
    """How long an expired node stays visible as OFFLINE before it is removed."""
    default_lease_ms: int = 60_000
    """Slot lease for reservations that do not name one."""
    max_lease_ms: int = 86_400_000
    """Largest lease a reservation may ask for."""
    expiry_interval_ms: int = 500
    """How often the expiry script runs (every sidecar runs it; it is safe to)."""
    l1_ttl_ms: int = 5_000
    """L1: how long a replica entry is served before it is revalidated (jittered +-20%)."""
    l2_ttl_ms: int = 30_000
    """L2: past it an unconfirmed entry is re-read from Redis before it is served."""
    miss_marker_min_ms: int = 1_000
    """Shortest life of a miss marker (each gets a random life in [min, max])."""
    miss_marker_max_ms: int = 10_000
    """Longest life of a miss marker."""
    complete_ms: int = 1_000
    """A replica in sync within this long answers an unknown id NOT_FOUND without Redis
    (0: never; every unknown id is looked up, behind its miss marker)."""
    version_check_interval_ms: int = 100
    """How often the version checker compares the replica's version with Redis's."""
    version_check_timeout_ms: int = 50
    """Timeout of one version check; a late answer is counted and ignored."""
    log_maxlen: int = 50_000
    """Approximate length the change-log stream is capped at."""
    health_weights: str = "cpu=0.2,gpu=0.15,mem=0.15,load=0.15,heartbeat_delay=0.1,error_rate=0.25"
    """Default relative health weights (pools may override); see docs/scheduling.md."""
    free_capacity_weight: float = 1.0
    """Default exponent of free slots in a candidate's draw weight (0: ignore free slots)."""
    reconcile_grace_ms: int = 10_000
    """A reservation younger than this survives a heartbeat whose job list lacks it."""
    schedule_attempts: int = 8
    """Most reservations one Schedule call tries before answering RESOURCE_EXHAUSTED."""
    metrics_epsilon: float = 0.05
    """A heartbeat's metrics are a material change (logged) when one moves by this much."""
    redis_timeout_ms: int = 1_000
    """Timeout of bulk Redis reads (preload, repair, log catch-up); the feed adds its block."""
    hot_timeout_ms: int = 2_000
    """Deadline of each hot-path Redis call (writes, reads-through): a write still waiting
    then is buffered (acknowledged, replayed). Not a failure signal: a busy Redis answers
    late and is not down; the failure detector decides that. No retries on the hot path
    but one on a reset connection."""
    watchdog_timeout_ms: int = 40
    """Floor of the failure detector's silence threshold: Redis silent on every connection
    for less than this is never down. On a quiet machine this decides how fast a frozen
    Redis is found; under load the threshold grows with the PING round trips' spread."""
    watchdog_ceiling_ms: int = 1_000
    """Ceiling of the silence threshold: this long without any answer is always down."""
    watchdog_interval_ms: int = 10
    """How often the failure detector's thread PINGs Redis."""
    journal: bool = True
    """Keep the write buffer in a journal in ``data_dir``, so writes acknowledged while
    Redis was unreachable survive a restart of the sidecar."""
    journal_fsync: bool = False
    """fsync the journal on every buffered write (survives a machine crash, not just a
    crash of the sidecar; costs a disk flush per write)."""
    write_buffer_max: int = 10_000
    """Writes (register, deregister, drain, release, pools) buffered while degraded."""
    heartbeat_buffer_max: int = 100_000
    """Nodes whose latest heartbeat is buffered while degraded."""
    reservation_policy: str = "reject"
    """ReserveSlot and Schedule while Redis is unreachable: ``reject`` (UNAVAILABLE, retry
    advice) or ``local`` (granted from the local view within ``local_slot_budget``,
    replayed on recovery; a node may be overcommitted, see docs/reliability.md)."""
    local_slot_budget: int = 1
    """Policy ``local``: slots this sidecar may grant on one node during one outage."""
    self_preservation_pause_ms: int = 3_000
    """A pause in expiry runs longer than this (no sidecar reached Redis) moves every
    deadline forward by the pause instead of expiring the fleet."""
    recovery_probe_max_ms: int = 1_000
    """Longest wait between recovery probes (exponential backoff with jitter up to it)."""
    feed_block_ms: int = 250
    """Block time of the change feed's stream reads; bounds staleness while idle."""
    heartbeat_batch_max: int = 256
    """Most heartbeats sent to Redis in one script call (each costs Redis 20-30 us: a
    batch holds Redis for up to 8 ms, so other clients are not kept waiting)."""
    heartbeat_queue_soft: int = 1_024
    """Heartbeats waiting for a batch at which acks start asking nodes to beat less often
    (backpressure; see docs/reliability.md)."""
    heartbeat_queue_max: int = 8_192
    """Heartbeats waiting for a batch at which streams stop being read until there is room."""
    heartbeat_lag_soft_ms: int = 20
    """Median event-loop lag (over the last second) at which acks start asking nodes to beat
    less often."""
    heartbeat_max_stretch: float = 4.0
    """The most the suggested heartbeat interval (and the deadline with it) is stretched."""
    heartbeat_stretch_hold_ms: int = 10_000
    """How long a stretched interval holds before it comes back down."""
    watch_queue_max: int = 4_096
    """Events a Watch stream may fall behind by before it is ended RESOURCE_EXHAUSTED."""
    watch_history: int = 10_000
    """Recent events kept in memory so a resuming Watch needs no snapshot."""
    watch_bookmark_ms: int = 10_000
    """Interval of BOOKMARK events on an idle Watch stream."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    shutdown_grace_s: float = 5.0
    """How long in-flight RPCs get to finish on SIGTERM."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "text"
    """``text`` or ``json`` (one object a line)."""
    metrics_listen: str = ""
    """HOST:PORT of the Prometheus ``/metrics`` endpoint; off when empty."""
    metrics_exporter: str = ""
    """``otlp`` or ``console`` to push metrics too (besides ``/metrics``); off when empty.
    Defaults from ``OTEL_METRICS_EXPORTER``, or ``otlp`` when an OTLP endpoint is set."""
    traces_exporter: str = ""
    """``otlp`` or ``console`` to export a span per RPC with Redis calls as children; off
    when empty. Defaults from ``OTEL_TRACES_EXPORTER``, or ``otlp`` when an OTLP endpoint
    is set. Endpoint, headers, sampler and service name come from the ``OTEL_*`` variables."""

    def __post_init__(self) -> None:
        if self.default_ttl_ms < self.min_ttl_ms or self.default_ttl_ms > self.max_ttl_ms:
            raise ValueError("default_ttl_ms must lie within [min_ttl_ms, max_ttl_ms]")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")
        if self.reservation_policy not in ("reject", "local"):
            raise ValueError("reservation_policy must be 'reject' or 'local'")
        for name in ("metrics_exporter", "traces_exporter"):
            if getattr(self, name) not in EXPORTERS:
                raise ValueError(f"{name} must be one of {EXPORTERS}")
        if self.metrics_listen and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ValueError("metrics_listen must be HOST:PORT")
        self.weights()  # raises ValueError on a malformed health_weights
        for name in (
            "offline_grace_ms",
            "default_lease_ms",
            "expiry_interval_ms",
            "log_maxlen",
            "redis_timeout_ms",
            "hot_timeout_ms",
            "watchdog_timeout_ms",
            "watchdog_ceiling_ms",
            "watchdog_interval_ms",
            "write_buffer_max",
            "heartbeat_buffer_max",
            "local_slot_budget",
            "self_preservation_pause_ms",
            "recovery_probe_max_ms",
            "feed_block_ms",
            "heartbeat_batch_max",
            "heartbeat_queue_soft",
            "heartbeat_queue_max",
            "heartbeat_lag_soft_ms",
            "heartbeat_stretch_hold_ms",
            "watch_queue_max",
            "watch_history",
            "watch_bookmark_ms",
            "schedule_attempts",
            "l1_ttl_ms",
            "l2_ttl_ms",
            "miss_marker_min_ms",
            "version_check_interval_ms",
            "version_check_timeout_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.complete_ms < 0:
            raise ValueError("complete_ms must be >= 0")
        if self.l2_ttl_ms < self.l1_ttl_ms or self.miss_marker_max_ms < self.miss_marker_min_ms:
            raise ValueError("need l2_ttl_ms >= l1_ttl_ms and miss_marker_max_ms >= min")
        if not 1 <= self.heartbeat_max_stretch <= 100:
            raise ValueError("heartbeat_max_stretch must lie within [1, 100]")
        if self.watchdog_ceiling_ms < self.watchdog_timeout_ms:
            raise ValueError("watchdog_ceiling_ms must be >= watchdog_timeout_ms")
        if self.reconcile_grace_ms < 0 or not 0 <= self.free_capacity_weight <= 10:
            raise ValueError("reconcile_grace_ms must be >= 0, free_capacity_weight in [0, 10]")

    def weights(self) -> SelectionWeights:
        """The default selection weights from ``health_weights`` and ``free_capacity_weight``."""
        values: dict[str, float] = {}
        for item in self.health_weights.split(","):
            name, sep, raw = item.partition("=")
            name = name.strip()
            if not sep or name not in HEALTH_WEIGHT_NAMES:
                raise ValueError(
                    f"health_weights: expected name=value pairs of {HEALTH_WEIGHT_NAMES}"
                )
            value = float(raw)
            if not 0 <= value <= 1000:
                raise ValueError(f"health_weights: {name} must be within [0, 1000]")
            values[name] = value
        return SelectionWeights(**values, free_capacity=self.free_capacity_weight)

    @property
    def heartbeat_interval_ms(self) -> int:
        """Interval suggested to nodes: a third of the default TTL, so two may be lost."""
        return max(self.default_ttl_ms // 3, 100)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(name: str, raw: str) -> object:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind in ("int",):
        return int(raw)
    if kind in ("float",):
        return float(raw)
    if kind == "Path":
        return Path(raw)
    if kind == "bool":
        if raw.lower() not in _BOOLS:
            raise ValueError(f"{name} must be one of {sorted(_BOOLS)}")
        return _BOOLS[raw.lower()]
    return raw


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False}
_BOOLS |= {"no": False, "off": False}

_CONFIGURABLE = [f.name for f in fields(Settings)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare one flag per setting; defaults stay None so the environment can fill in."""
    for f in fields(Settings):
        parser.add_argument(
            _flag(f.name), dest=f.name, default=None, help=f"env {ENV_PREFIX}{f.name.upper()}"
        )


def from_sources(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name in _CONFIGURABLE:
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or raw == "":
            continue
        values[name] = _convert(name, str(raw))
    for signal in ("metrics", "traces"):
        values.setdefault(f"{signal}_exporter", _otel_exporter(env, signal))
    return Settings(**values)  # type: ignore[arg-type]


def _otel_exporter(env: Mapping[str, str], signal: str) -> str:
    """The exporter the standard ``OTEL_*`` variables ask for: ``OTEL_<SIGNAL>_EXPORTER``
    (``none`` is off), else ``otlp`` when an OTLP endpoint is set, else off."""
    chosen = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if chosen:
        first = chosen.split(",", 1)[0].strip()
        # "prometheus" is served by metrics_listen (a pull endpoint), not pushed.
        return "" if first in ("none", "prometheus") else first
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    return "otlp" if any(env.get(name) for name in endpoints) else ""


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="registry serve")
    add_arguments(parser)
    return from_sources(parser.parse_args(argv))
