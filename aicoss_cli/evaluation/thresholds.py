"""From probabilities to decisions: per-class thresholds and the 0/1 label files.

A decision is `probability ≥ threshold`. Thresholds come from a number (one for every class), a
`class,threshold` CSV, or `auto`: fit per class on the val split to maximise F1 (`fit_thresholds`),
with the gain measured on a held-out half (`held_out_threshold_gain`). The math is numpy only;
files go through the csv module. This module imports no torch (`aicoss score` does not need it).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path
from aicoss_cli.data.submission import preview, probability_cell, read_csv_rows
from aicoss_cli.evaluation.halves import halves
from aicoss_cli.evaluation.metrics import as_arrays, threshold_scores

DEFAULT_THRESHOLD = 0.5
MIN_POSITIVES = 10
GLOBAL_CANDIDATES = 2048
THRESHOLDS_HEADER = ("class", "threshold")

ThresholdSpec = float | Literal["auto"] | Path


# --------------------------------------------------------------------------- the spec: T | auto | CSV


def parse_threshold_spec(text: str, option: str = "--labels") -> ThresholdSpec:
    """`T` (a number in [0, 1]) → float, `auto` → "auto", anything else → the Path of an existing
    `class,threshold` CSV. A text that reads as a number is a number, never a file name."""
    raw = str(text).strip()
    if raw.lower() == "auto":
        return "auto"
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise UserError(f"{option} {raw}: a threshold must be a number in [0, 1] (got {raw!r}); "
                            "decisions are probability ≥ threshold")
        return value
    path = Path(raw)
    if not path.is_file():
        raise UserError(f"{option} {raw}: not a number in [0, 1], `auto`, or an existing class,threshold CSV file")
    return path


def read_thresholds_csv(path: Path, classes: Sequence[str]) -> np.ndarray:
    """Per-class thresholds from a `class,threshold` CSV: every class of `classes` exactly once (any
    order), each value finite in [0, 1]. Returned in the order of `classes`."""
    path = Path(path)
    header, rows = read_csv_rows(path, "thresholds CSV")
    if tuple(h.strip() for h in header) != THRESHOLDS_HEADER:
        raise UserError(f"{path}: header must be `class,threshold` (got {','.join(header)!r})")
    wanted = {c: j for j, c in enumerate(classes)}
    values = np.full(len(classes), np.nan)
    seen: dict[str, int] = {}
    for line, row in rows:
        name, raw = (row[0] if row[0] in wanted else row[0].strip()), row[1]  # a class name as written, or trimmed
        if name not in wanted:
            raise UserError(f"{path}: row {line}: class {name!r} is not one of the {len(classes)} classes "
                            f"({preview(classes)})")
        if name in seen:
            raise UserError(f"{path}: row {line}: class {name!r} is listed twice (also row {seen[name]}); "
                            "give each class one threshold")
        seen[name] = line
        values[wanted[name]] = probability_cell(raw, path, line, "threshold", "a threshold")
    missing = [c for c in classes if c not in seen]
    if missing:
        raise UserError(f"{path}: no threshold for {len(missing)} of the {len(classes)} classes "
                        f"(e.g. {missing[0]!r}); list every class once")
    return values


# --------------------------------------------------------------------------- fitting


@dataclass
class FitResult:
    """Per-class thresholds fit on val, and which classes fell back to the global threshold."""

    thresholds: np.ndarray      # (K,), the one to use for each class
    global_threshold: float     # the best single threshold for every class (macro F1)
    fallback: list[int]         # classes (indices) with fewer than min_positives val positives
    positives: np.ndarray       # (K,) annotated val positives per class
    f1: np.ndarray              # (K,) in-sample F1 of each class at its threshold
    min_positives: int


def fit_thresholds(targets, probs, min_positives: int = MIN_POSITIVES) -> FitResult:
    """Per-class thresholds that maximise F1 on the given (val) targets and probabilities.

    For class j with P_j annotated positives (target -1 is left out) and the decision s ≥ t:
        F1_j(t) = 2·TP_j(t) / (#{s ≥ t} + P_j)
    F1_j only changes at the class's distinct scores, so every one is tried; the best cut keeps
    the scores ≥ s_k and t_j is placed halfway to the next lower distinct score (same decisions
    in sample, a margin out of sample; rounded to the fewest decimals within a quarter of the gap
    of the midpoint). Among equal F1, the highest threshold wins.
    Rule for rare classes: a class with P_j < min_positives (so also P_j = 0) takes the global
    threshold t* = argmax_t mean_{j: P_j ≥ 1} F1_j(t), one t for every class, tried at the
    distinct pooled scores (at most GLOBAL_CANDIDATES evenly spaced among them) and at 0.5, ties
    to the highest t, placed halfway as above. With no positive at all, t* = 0.5.
    """
    y, s = as_arrays(targets, probs)
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1 (got {min_positives})")
    k = y.shape[1]
    positives = ((y > 0) & (y != -1)).sum(axis=0)
    global_t = _fit_global(y, s)
    thresholds = np.full(k, global_t)
    fallback = []
    for j in range(k):
        if positives[j] < min_positives:
            fallback.append(j)
            continue
        keep = y[:, j] != -1
        thresholds[j] = _fit_one(y[keep, j] > 0, s[keep, j])
    f1 = threshold_scores(y, s, thresholds).f1
    return FitResult(thresholds, global_t, fallback, positives, f1, min_positives)


def _fit_one(positive: np.ndarray, score: np.ndarray) -> float:
    order = np.argsort(-score, kind="mergesort")
    score, positive = score[order], positive[order]
    # the last index of each run of equal scores closes a cut: predict the first last+1 entries
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tp = np.cumsum(positive)[last]
    f1 = 2.0 * tp / (last + 1 + positive.sum())
    best = int(np.argmax(f1))  # first maximum = highest threshold
    lower = score[last[best] + 1] if last[best] + 1 < len(score) else None
    return _halfway(score[last[best]], lower)


def _halfway(kept: float, cut: float | None) -> float:
    """A threshold in (cut, kept]: the midpoint, written with the fewest decimals that keep it in the
    interval (0.348, not 0.34792544999999997), so the thresholds file reads well and decides the same."""
    kept = float(kept)
    if cut is None:
        return kept
    cut = float(cut)
    mid = (kept + cut) / 2.0
    for digits in range(1, 18):
        short = round(mid, digits)
        if cut < short <= kept and abs(short - mid) <= (kept - cut) / 4:
            return short
    return mid if cut < mid <= kept else kept


def _fit_global(y: np.ndarray, s: np.ndarray) -> float:
    annotated = y != -1
    pooled = np.unique(s[annotated])
    scored = [j for j in range(y.shape[1]) if ((y[:, j] > 0) & annotated[:, j]).any()]
    if not scored or pooled.size == 0:
        return DEFAULT_THRESHOLD
    candidates = pooled
    if candidates.size > GLOBAL_CANDIDATES:
        candidates = candidates[np.linspace(0, candidates.size - 1, GLOBAL_CANDIDATES).round().astype(int)]
    candidates = np.unique(np.r_[candidates, DEFAULT_THRESHOLD])
    f1 = np.zeros(candidates.size)
    for j in scored:
        keep = annotated[:, j]
        col = np.sort(s[keep, j])
        pos = np.sort(s[keep, j][y[keep, j] > 0])
        predicted = col.size - np.searchsorted(col, candidates, side="left")
        tp = pos.size - np.searchsorted(pos, candidates, side="left")
        f1 += 2.0 * tp / (predicted + pos.size)
    f1 /= len(scored)
    best = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[-1])  # ties: the highest threshold
    t = float(candidates[best])
    # place it halfway between the pooled scores it separates: the same decisions for every class
    above = pooled[pooled >= t]
    below = pooled[pooled < t]
    if above.size == 0:
        return t
    return _halfway(above[0], below[-1] if below.size else None)


@dataclass
class HeldOutThresholds:
    """Per-class thresholds fit on half A of val and scored (macro F1) on half B, against the best
    single global threshold fit on the same half A (and the default 0.5)."""

    n_fit: int
    n_score: int
    global_threshold: float
    global_f1: float
    auto_f1: float
    default_f1: float
    fallback: int

    @property
    def gain(self) -> float:
        return self.auto_f1 - self.global_f1


def held_out_threshold_gain(targets, probs, seed: int = 0, min_positives: int = MIN_POSITIVES,
                            rows: tuple[np.ndarray, np.ndarray] | None = None) -> HeldOutThresholds:
    """Fit on a seeded random half of the val images, score macro F1 on the other half (the same
    halves as `infer.ensemble.held_out_gain` draws for weights: `halves`), or on the given (fit,
    score) rows (out-of-fold rows: `fold_halves`)."""
    y, s = as_arrays(targets, probs)
    n = len(y)
    fit, score = rows if rows is not None else halves(n, seed)
    result = fit_thresholds(y[fit], s[fit], min_positives=min_positives)
    yb, sb = y[score], s[score]
    return HeldOutThresholds(
        n_fit=len(fit), n_score=len(score), global_threshold=result.global_threshold,
        global_f1=threshold_scores(yb, sb, result.global_threshold).macro_f1,
        auto_f1=threshold_scores(yb, sb, result.thresholds).macro_f1,
        default_f1=threshold_scores(yb, sb, DEFAULT_THRESHOLD).macro_f1,
        fallback=len(result.fallback))


# --------------------------------------------------------------------------- resolving a spec


@dataclass
class Thresholds:
    """What `--labels T|auto|CSV` resolved to: one threshold per class and where it came from."""

    values: np.ndarray                        # (K,), in the order of `classes`
    classes: list[str]
    source: str                               # "0.5", "auto (...)", or the CSV's path
    fallback: list[str] = field(default_factory=list)   # auto: classes that took the global threshold
    global_threshold: float | None = None     # auto: the best single threshold on val
    held_out: HeldOutThresholds | None = None  # auto: the gain on a held-out half of val
    fit: FitResult | None = None

    def to_json(self, labels_path: Path | None = None, thresholds_path: Path | None = None) -> dict:
        held = self.held_out
        return json_ready({
            "labels_csv": None if labels_path is None else str(labels_path),
            "thresholds_csv": None if thresholds_path is None else str(thresholds_path),
            "source": self.source, "thresholds": dict(zip(self.classes, map(float, self.values))),
            "fallback": self.fallback, "global_threshold": self.global_threshold,
            "held_out": None if held is None else {"n_fit": held.n_fit, "n_score": held.n_score,
                                                    "global_threshold": held.global_threshold,
                                                    "global_f1": held.global_f1, "auto_f1": held.auto_f1,
                                                    "gain": held.gain},
        })


def resolve_thresholds(spec: str | ThresholdSpec, classes: Sequence[str], val_targets=None, val_probs=None, *,
                       option: str = "--labels", min_positives: int = MIN_POSITIVES, seed: int = 0,
                       rows: tuple[np.ndarray, np.ndarray] | None = None, what: str = "val") -> Thresholds:
    """One threshold per class from `spec` (text as typed, or what `parse_threshold_spec` returned);
    `auto` fits on val_targets / val_probs (N, K) and measures the held-out gain (on `rows`, the
    (fit, score) halves, when given); `what` names those images in the source ("val", "out-of-fold")."""
    if isinstance(spec, str) and spec != "auto":
        spec = parse_threshold_spec(spec, option)
    classes = list(classes)
    if isinstance(spec, Path):
        return Thresholds(read_thresholds_csv(spec, classes), classes, str(spec))
    if spec == "auto":
        if val_targets is None or val_probs is None:
            raise UserError(f"{option} auto fits per-class thresholds on a val split with known labels, and there is "
                            "none here; give a number in [0, 1] or a class,threshold CSV (e.g. the _thresholds.csv "
                            "that --labels auto wrote)")
        if np.shape(val_probs)[1:] != (len(classes),):
            raise ValueError(f"{len(classes)} classes but val probabilities of shape {np.shape(val_probs)}")
        fit = fit_thresholds(val_targets, val_probs, min_positives=min_positives)
        held = held_out_threshold_gain(val_targets, val_probs, seed=seed, min_positives=min_positives, rows=rows)
        source = f"auto (F1-optimal per class on {len(val_probs)} {what} images)"
        return Thresholds(fit.thresholds, classes, source, [classes[j] for j in fit.fallback], fit.global_threshold,
                          held, fit)
    value = float(spec)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UserError(f"{option}: a threshold must be a number in [0, 1] (got {value!r})")
    return Thresholds(np.full(len(classes), value), classes, f"{value:g}")


# --------------------------------------------------------------------------- what it writes


def label_output_paths(out_csv: Path) -> tuple[Path, Path]:
    """`<out stem>_labels.csv` and `<out stem>_thresholds.csv` beside `out_csv` (check them before compute)."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}_labels.csv"), out_csv.with_name(f"{out_csv.stem}_thresholds.csv")


def write_label_outputs(out_csv: Path, ids: Sequence[str], classes: Sequence[str], probs,
                        thresholds: Thresholds | Sequence[float] | float) -> tuple[Path, Path]:
    """Write the 0/1 decisions `probs ≥ threshold` (img_id + the classes, in the rows' order) and the
    thresholds (`class,threshold`, exact) beside `out_csv`, each to a temporary name renamed at the
    end: an error while writing leaves neither (and no temporary file)."""
    p = np.asarray(probs, dtype=np.float64)
    t = thresholds.values if isinstance(thresholds, Thresholds) else thresholds
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), (len(classes),))
    if p.shape != (len(ids), len(classes)):
        raise ValueError(f"probs {p.shape} must be ({len(ids)} ids, {len(classes)} classes)")
    labels = (p >= t).astype(np.int8)
    labels_path, thresholds_path = label_output_paths(out_csv)
    try:
        with atomic_path(labels_path) as tmp_labels, atomic_path(thresholds_path) as tmp_thresholds:
            with open(tmp_labels, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["img_id", *classes])
                writer.writerows([i, *row] for i, row in zip(ids, labels.tolist()))
            with open(tmp_thresholds, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(THRESHOLDS_HEADER)
                writer.writerows((c, repr(float(v))) for c, v in zip(classes, t))
    except OSError as exc:
        raise UserError(f"{labels_path}: cannot be written ({exc.strerror or exc}); choose another --out") from None
    return labels_path, thresholds_path


# --------------------------------------------------------------------------- reading CSV cells


