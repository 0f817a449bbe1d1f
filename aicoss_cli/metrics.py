"""Macro mean average precision, the competition's score."""

from __future__ import annotations

import numpy as np


def average_precision_per_class(targets, scores) -> np.ndarray:
    """Average precision of each class, as scikit-learn's `average_precision_score` computes it.

    AP = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds, highest first (tied scores
    form one threshold). Entries whose target is -1 (not annotated) are left out. A class with no
    positive gets NaN: its AP is undefined.
    """
    y = np.asarray(targets)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"targets {y.shape} and scores {s.shape} must be the same (samples, classes) shape")
    aps = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        keep = y[:, j] != -1
        aps[j] = _average_precision(y[keep, j] > 0, s[keep, j])
    return aps


def _average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    tp = np.cumsum(positive)
    # the last index of each run of equal scores closes a threshold
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(targets, scores) -> float:
    """Macro mAP over the classes that have at least one positive (as scikit-learn skips none, we say so).

    Use `skipped_classes` to report how many classes had no positive and were left out.
    """
    aps = average_precision_per_class(targets, scores)
    valid = ~np.isnan(aps)
    return float(aps[valid].mean()) if valid.any() else float("nan")


def skipped_classes(targets) -> int:
    """How many classes have no positive (among annotated entries) and so no AP."""
    y = np.asarray(targets)
    return int(((y > 0).sum(axis=0) == 0).sum())
