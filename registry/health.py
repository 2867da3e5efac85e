"""Health score: one number in [0, 1] from a node's load figures, higher is healthier.

1 minus the weighted mean of cpu, gpu, mem, load, heartbeat delay and error rate. The
heartbeat script computes it with the sidecar's default weights (the same formula, in
Lua) and stores it with the node; a pool with weights of its own is ranked by
``health_column`` over the replica's metric columns instead.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from registry.model import DEFAULT_WEIGHTS, Metrics, SelectionWeights


def health_score(m: Metrics, w: SelectionWeights = DEFAULT_WEIGHTS) -> float:
    """Rounded to 4 decimals, as the heartbeat script stores it."""
    weights = w.health_vector()
    total = sum(weights)
    if total <= 0:
        return 1.0
    values = (m.cpu, m.gpu, m.mem, m.load, m.heartbeat_delay, m.error_rate)
    used = sum(wi * vi for wi, vi in zip(weights, values, strict=True))
    h = min(max(1.0 - used / total, 0.0), 1.0)
    return math.floor(h * 10000 + 0.5) / 10000  # half up, as Lua's math.floor does it


def health_column(metrics: npt.NDArray[np.float64], w: SelectionWeights) -> npt.NDArray[np.float64]:
    """Health of every row of a (nodes x 6) metric matrix, in the column order of
    ``SelectionWeights.health_vector``."""
    weights = np.asarray(w.health_vector())
    total = float(weights.sum())
    if total <= 0:
        return np.ones(len(metrics))
    return np.clip(1.0 - (metrics @ weights) / total, 0.0, 1.0)  # type: ignore[no-any-return]
