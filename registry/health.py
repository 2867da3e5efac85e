"""Health score: one number in [0, 1] from a node's metrics, higher is healthier.

Computed by the sidecar that receives a heartbeat and stored with the node, so every
replica ranks by the same figure. Weights are relative; they need not sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.model import Metrics


@dataclass(frozen=True, slots=True)
class HealthWeights:
    cpu: float = 0.25
    gpu: float = 0.15
    mem: float = 0.2
    load: float = 0.15
    error_rate: float = 0.25


DEFAULT_WEIGHTS = HealthWeights()


def health_score(m: Metrics, w: HealthWeights = DEFAULT_WEIGHTS) -> float:
    """1 minus the weighted mean of the load fractions: an idle, error-free node scores 1."""
    total = w.cpu + w.gpu + w.mem + w.load + w.error_rate
    if total <= 0:
        return 1.0
    used = (
        w.cpu * m.cpu
        + w.gpu * m.gpu
        + w.mem * m.mem
        + w.load * m.load
        + w.error_rate * m.error_rate
    )
    return round(min(max(1.0 - used / total, 0.0), 1.0), 4)
