"""Macro mean average precision, the competition's score; precision, recall and F1 at thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def as_arrays(targets, scores) -> tuple[np.ndarray, np.ndarray]:
    """Targets and float64 scores as arrays of one (samples, classes) shape; ValueError otherwise."""
    y = np.asarray(targets)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"targets {y.shape} and scores {s.shape} must be the same (samples, classes) shape")
    return y, s


def average_precision_per_class(targets, scores) -> np.ndarray:
    """Average precision of each class, as scikit-learn's `average_precision_score` computes it.

    AP = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds, highest first (tied scores
    form one threshold). Entries whose target is -1 (not annotated) are left out. A class with no
    positive gets NaN: its AP is undefined.
    """
    y, s = as_arrays(targets, scores)
    aps = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        keep = y[:, j] != -1
        aps[j] = _average_precision(y[keep, j] > 0, s[keep, j])
    return aps


def _average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    if not positive.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(positive, score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_recall_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and the threshold at each distinct score, highest score first (as
    scikit-learn's `precision_recall_curve`, reversed and without its final (P=1, R=0) point).

    At threshold t (decisions score ≥ t): P = TP / (TP + FP), R = TP / #positives (NaN with no
    positive); tied scores form one threshold."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    tp = np.cumsum(positive)
    # the last index of each run of equal scores closes a threshold
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1] if len(score) else np.array([], dtype=np.int64)
    tp = tp[last]
    n_pos = int(positive.sum())
    recall = tp / n_pos if n_pos else np.full(len(tp), np.nan)
    return tp / (last + 1), recall, score[last]


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


# --------------------------------------------------------------------------- decisions at thresholds


@dataclass(frozen=True)
class ThresholdScores:
    """Precision, recall and F1 of 0/1 decisions `score ≥ threshold`, per class and averaged.

    Per class j, over its annotated entries (target ≠ -1):
        TP_j = #{y = 1, s ≥ t_j},  FP_j = #{y = 0, s ≥ t_j},  FN_j = #{y = 1, s < t_j}
        P_j = TP_j / (TP_j + FP_j),  R_j = TP_j / (TP_j + FN_j),  F1_j = 2·TP_j / (2·TP_j + FP_j + FN_j)
    A zero denominator gives 0: scikit-learn's `precision_recall_fscore_support(zero_division=0)`
    (a class with no positive has R = F1 = 0, and P = 0 too when nothing is predicted for it).
    micro: the same formulas on TP, FP, FN summed over every class (all annotated entries).
    macro: the unweighted mean over the classes with at least one positive — the classes macro
    mAP averages over — so a class with nothing to find neither helps nor hurts; it is counted in
    `skipped` (scikit-learn's average="macro" on those columns gives the same numbers).
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    positives: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        """Mask of the classes with at least one positive (those the macro means average over)."""
        return self.positives > 0

    @property
    def skipped(self) -> int:
        return int((~self.scored).sum())

    def _macro(self, values: np.ndarray) -> float:
        return float(values[self.scored].mean()) if self.scored.any() else float("nan")

    @property
    def macro_precision(self) -> float:
        return self._macro(self.precision)

    @property
    def macro_recall(self) -> float:
        return self._macro(self.recall)

    @property
    def macro_f1(self) -> float:
        return self._macro(self.f1)

    @property
    def micro_precision(self) -> float:
        return _ratio(self.tp.sum(), self.tp.sum() + self.fp.sum())

    @property
    def micro_recall(self) -> float:
        return _ratio(self.tp.sum(), self.tp.sum() + self.fn.sum())

    @property
    def micro_f1(self) -> float:
        tp = self.tp.sum()
        return _ratio(2 * tp, 2 * tp + self.fp.sum() + self.fn.sum())


def _ratio(num, den):
    """num / den, elementwise, with 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)
    return float(out) if out.ndim == 0 else out


def threshold_scores(targets, scores, thresholds) -> ThresholdScores:
    """Precision, recall and F1 of the decisions `score ≥ threshold` (see `ThresholdScores`).

    `thresholds` is one number for every class or one per class (shape (K,))."""
    y, s = as_arrays(targets, scores)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    predicted = s >= t
    annotated = y != -1
    positive = (y > 0) & annotated
    negative = (y == 0)
    tp = (predicted & positive).sum(axis=0)
    fp = (predicted & negative).sum(axis=0)
    fn = (~predicted & positive).sum(axis=0)
    return ThresholdScores(precision=_ratio(tp, tp + fp), recall=_ratio(tp, tp + fn), f1=_ratio(2 * tp, 2 * tp + fp + fn),
                           positives=positive.sum(axis=0), tp=tp, fp=fp, fn=fn)
