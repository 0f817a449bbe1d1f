"""Held-out halves: a fit on one half of the val images judged on the other, so a gain that only
fits noise shows as none. Ensemble weights and per-class thresholds draw the same halves."""

from __future__ import annotations

import numpy as np


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half of n val images (to fit on) and the other half (to score on)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def fold_halves(fold_of: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Halves of out-of-fold rows along the folds: the rows of a seeded random ⌊K/2⌋ of the K folds
    (to fit on) and those of the others (to score on). Each fold's rows come from one model, so the
    score half judges the fit on models it never saw, as the test set judges the folds' mean."""
    fold_of = np.asarray(fold_of)
    folds = np.unique(fold_of)
    if len(folds) < 2:
        raise ValueError("fold halves need at least 2 folds")
    fit_folds = np.random.default_rng(seed).permutation(folds)[: len(folds) // 2]
    fit = np.isin(fold_of, fit_folds)
    return np.flatnonzero(fit), np.flatnonzero(~fit)
