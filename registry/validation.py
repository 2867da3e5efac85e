"""Input checks, applied before anything reaches Redis or a key name."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from registry.errors import InvalidArgument
from registry.model import (
    InstalledService,
    LanguagePair,
    Metrics,
    NodeSpec,
    Pool,
    SelectionWeights,
    Selector,
)

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""Ids become parts of Redis keys: no braces (hash tags), colons (separators) or spaces."""
LANG_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,35}")
"""BCP 47-like codes (en, zh-Hans, pt-BR); 35 is BCP 47's longest registered tag length."""

MAX_ADDRESS = 512
MAX_LIST = 256
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_SERVICE_FIELD = 128
MAX_CAPACITY = 1_000_000
MAX_SELECT_COUNT = 1_000
MAX_REPORTED_JOBS = 10_000


def check_id(field: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(field, "must be 1-128 characters of [A-Za-z0-9._-]")
    return value


def check_optional_id(field: str, value: str) -> str:
    return check_id(field, value) if value else value


def check_lang_pair(field: str, pair: LanguagePair) -> LanguagePair:
    for part, code in (("src", pair.src), ("tgt", pair.tgt)):
        if not LANG_PATTERN.fullmatch(code):
            raise InvalidArgument(
                f"{field}.{part}", "must be a language code of [A-Za-z0-9_-], 1-35"
            )
    return pair


def check_fraction(field: str, value: float) -> float:
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(field, "must be within [0, 1]")
    return value


def check_metrics(field: str, m: Metrics) -> Metrics:
    for name in ("cpu", "gpu", "mem", "load", "error_rate"):
        check_fraction(f"{field}.{name}", getattr(m, name))
    return m


def check_labels(field: str, labels: Mapping[str, str]) -> Mapping[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field, f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY:
            raise InvalidArgument(
                f"{field}[{key[:32]!r}]", f"key must be 1-{MAX_LABEL_KEY} characters"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                f"{field}[{key!r}]", f"value must be at most {MAX_LABEL_VALUE} characters"
            )
    return labels


def _check_count(field: str, items: Iterable[object]) -> None:
    if sum(1 for _ in items) > MAX_LIST:
        raise InvalidArgument(field, f"at most {MAX_LIST} entries")


def check_service(field: str, s: InstalledService) -> InstalledService:
    if not s.name:
        raise InvalidArgument(f"{field}.name", "must not be empty")
    for part in ("name", "type", "version"):
        if len(getattr(s, part)) > MAX_SERVICE_FIELD:
            raise InvalidArgument(f"{field}.{part}", f"at most {MAX_SERVICE_FIELD} characters")
    return s


def check_spec(spec: NodeSpec, field: str = "node") -> NodeSpec:
    check_id(f"{field}.node_id", spec.node_id)
    if len(spec.address) > MAX_ADDRESS:
        raise InvalidArgument(f"{field}.address", f"at most {MAX_ADDRESS} characters")
    if spec.capacity < 0 or spec.capacity > MAX_CAPACITY:
        raise InvalidArgument(f"{field}.capacity", f"must be within [0, {MAX_CAPACITY}]")
    for name in ("pools", "lang_pairs", "services"):
        _check_count(f"{field}.{name}", getattr(spec, name))
    for i, pool in enumerate(spec.pools):
        check_id(f"{field}.pools[{i}]", pool)
    for i, pair in enumerate(spec.lang_pairs):
        check_lang_pair(f"{field}.lang_pairs[{i}]", pair)
    for i, service in enumerate(spec.services):
        check_service(f"{field}.services[{i}]", service)
    check_labels(f"{field}.labels", spec.labels)
    if spec.metrics is not None:
        check_metrics(f"{field}.metrics", spec.metrics)
    return spec


def check_ttl(field: str, ttl_ms: int, default: int, low: int, high: int) -> int:
    if ttl_ms == 0:
        return default
    if ttl_ms < low or ttl_ms > high:
        raise InvalidArgument(field, f"must be 0 (default) or within [{low}, {high}] ms")
    return ttl_ms


def check_selector(sel: Selector, field: str = "") -> Selector:
    prefix = f"{field}." if field else ""
    check_optional_id(f"{prefix}pool_id", sel.pool_id)
    if sel.lang_pair is not None:
        check_lang_pair(f"{prefix}lang_pair", sel.lang_pair)
    _check_count(f"{prefix}required_services", sel.required_services)
    for i, name in enumerate(sel.required_services):
        if not name or len(name) > MAX_SERVICE_FIELD:
            raise InvalidArgument(f"{prefix}required_services[{i}]", "must be 1-128 characters")
    check_labels(f"{prefix}labels", sel.labels)
    if sel.count < 1 or sel.count > MAX_SELECT_COUNT:
        raise InvalidArgument(
            f"{prefix}count", f"must be within [0, {MAX_SELECT_COUNT}] (0 means 1)"
        )
    if len(sel.exclude_node_ids) > 10 * MAX_LIST:
        raise InvalidArgument(f"{prefix}exclude_node_ids", f"at most {10 * MAX_LIST} entries")
    for i, node_id in enumerate(sorted(sel.exclude_node_ids)):
        check_id(f"{prefix}exclude_node_ids[{i}]", node_id)
    check_fraction(f"{prefix}min_health", sel.min_health)
    return sel


MAX_WEIGHT = 1000.0
MAX_FREE_CAPACITY_WEIGHT = 10.0


def check_weights(field: str, w: SelectionWeights) -> SelectionWeights:
    for name in ("cpu", "gpu", "mem", "load", "heartbeat_delay", "error_rate"):
        value = getattr(w, name)
        if math.isnan(value) or not 0.0 <= value <= MAX_WEIGHT:
            raise InvalidArgument(f"{field}.{name}", f"must be within [0, {MAX_WEIGHT:g}]")
    if math.isnan(w.free_capacity) or not 0.0 <= w.free_capacity <= MAX_FREE_CAPACITY_WEIGHT:
        raise InvalidArgument(
            f"{field}.free_capacity", f"must be within [0, {MAX_FREE_CAPACITY_WEIGHT:g}]"
        )
    return w


def check_pool(pool: Pool, field: str = "pool") -> Pool:
    check_id(f"{field}.pool_id", pool.pool_id)
    _check_count(f"{field}.lang_pairs", pool.lang_pairs)
    for i, pair in enumerate(sorted(pool.lang_pairs, key=lambda p: (p.src, p.tgt))):
        check_lang_pair(f"{field}.lang_pairs[{i}]", pair)
    _check_count(f"{field}.required_services", pool.required_services)
    for i, name in enumerate(pool.required_services):
        if not name or len(name) > MAX_SERVICE_FIELD:
            raise InvalidArgument(f"{field}.required_services[{i}]", "must be 1-128 characters")
    check_labels(f"{field}.labels", pool.labels)
    check_fraction(f"{field}.min_health", pool.min_health)
    if pool.weights is not None:
        check_weights(f"{field}.weights", pool.weights)
    return pool


def check_job_ids(field: str, job_ids: Iterable[str]) -> tuple[str, ...]:
    ids = tuple(job_ids)
    if len(ids) > MAX_REPORTED_JOBS:
        raise InvalidArgument(field, f"at most {MAX_REPORTED_JOBS} entries")
    for i, job_id in enumerate(ids):
        check_id(f"{field}[{i}]", job_id)
    return ids
