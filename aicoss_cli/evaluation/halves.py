"""Held-out halves: a fit on one half of the val images judged on the other, so a gain that only
fits noise shows as none. Ensemble weights and per-class thresholds draw the same halves."""

from __future__ import annotations

import numpy as np


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half of n val images (to fit on) and the other half (to score on)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])
