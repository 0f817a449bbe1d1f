"""Scores at thresholds: macro mAP, micro and macro F1 / precision / recall, the per-class table
(`per_class_rows`, written as `<out>_per_class.csv`), and `aicoss score`: a submission-shaped CSV
against a labels CSV, rows matched by img_id.

Both files `score` reads are untrusted: a missing, extra or duplicated id, another class set, a
duplicated column, or a value that is not a probability (or a label in {-1, 0, 1}) is a one-line
error naming the file, line and column. This module imports no torch.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path
from aicoss_cli.data.submission import ScoreTable, preview, read_labels_csv, read_probabilities_csv
from aicoss_cli.evaluation.metrics import (
    as_arrays,
    average_precision_per_class,
    mean_average_precision,
    threshold_scores,
)
from aicoss_cli.evaluation.thresholds import DEFAULT_THRESHOLD, Thresholds, parse_threshold_spec, resolve_thresholds


def score_files(predictions: Path, labels: Path, thresholds: str = str(DEFAULT_THRESHOLD),
                option: str = "--thresholds") -> dict:
    """`aicoss score`: match the rows by img_id (any order) and the class columns by name, then
    `score_report` at the thresholds (a number or a class,threshold CSV)."""
    spec = parse_threshold_spec(thresholds, option)  # a bad spec fails before any file is read
    pred = read_probabilities_csv(predictions)
    truth = read_labels_csv(labels)
    targets = matched_labels(pred, truth)
    resolved = resolve_thresholds(spec, pred.classes, option=option)
    report = score_report(pred.classes, targets, pred.values, resolved)
    return {"predictions": str(pred.path), "labels": str(truth.path), "images": len(pred.ids),
            "thresholds": resolved.source, **report}


def matched_labels(pred: ScoreTable, truth: ScoreTable) -> np.ndarray:
    """The labels (N, K) of `truth` in the rows and class columns of `pred`: the same class set and
    the same img_ids (any order), else a one-line error naming what differs."""
    if set(pred.classes) != set(truth.classes):
        missing = [c for c in truth.classes if c not in pred.classes]
        extra = [c for c in pred.classes if c not in truth.classes]
        parts = ([f"missing {preview(missing)}"] if missing else []) + ([f"extra {preview(extra)}"] if extra else [])
        raise UserError(f"{pred.path}: class columns differ from {truth.path}'s ({'; '.join(parts)}); "
                        "score a submission against labels for the same classes")
    truth_row = {i: r for r, i in enumerate(truth.ids)}
    extra = [r for r, i in enumerate(pred.ids) if i not in truth_row]
    if extra:
        r = extra[0]
        raise UserError(f"{pred.path}: row {pred.lines[r]}: img_id {pred.ids[r]!r} is not in {truth.path} "
                        f"({len(extra)} such ids); score against the labels of the same images")
    if len(pred.ids) != len(truth.ids):
        have = set(pred.ids)
        missing = [r for r, i in enumerate(truth.ids) if i not in have]
        r = missing[0]
        raise UserError(f"{pred.path}: no row for img_id {truth.ids[r]!r} ({truth.path} row {truth.lines[r]}; "
                        f"{len(missing)} ids missing); predict every labelled image")
    columns = [truth.classes.index(c) for c in pred.classes]
    return truth.values[[truth_row[i] for i in pred.ids]][:, columns]


PER_CLASS_COLUMNS = ("class", "positives", "ap", "f1", "precision", "recall", "threshold", "rank")


def per_class_path_for(out: Path) -> Path:
    """`<out stem>_per_class.csv` beside --out: two predictions in one folder keep their own tables."""
    return Path(out).with_name(f"{Path(out).stem}_per_class.csv")


def per_class_rows(classes: Sequence[str], targets, probs, thresholds) -> list[dict]:
    """One row per class, in class order: class, positives, ap, f1, precision, recall, threshold,
    rank (by AP, 1 = weakest; None for a class without a positive, whose AP is NaN)."""
    y, s = as_arrays(targets, probs)
    if isinstance(thresholds, Thresholds):
        thresholds = thresholds.values
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (y.shape[1],))
    aps = average_precision_per_class(y, s)
    decided = threshold_scores(y, s, t)
    order = [int(i) for i in np.argsort(np.where(np.isnan(aps), np.inf, aps), kind="stable")]
    rank = {j: r + 1 for r, j in enumerate(order) if not np.isnan(aps[j])}
    return [{"class": c, "positives": int(decided.positives[j]), "ap": float(aps[j]), "f1": float(decided.f1[j]),
             "precision": float(decided.precision[j]), "recall": float(decided.recall[j]), "threshold": float(t[j]),
             "rank": rank.get(j)} for j, c in enumerate(classes)]


def write_per_class_csv(path: Path, rows: list[dict]) -> None:
    """per_class_ap.csv: class,positives,ap,f1,precision,recall,threshold,rank (NaN AP and no rank: empty)."""
    def cell(key, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if key == "threshold":
            return repr(float(value))
        return f"{value:.6f}" if isinstance(value, float) else value

    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(PER_CLASS_COLUMNS)
            writer.writerows([cell(k, r[k]) for k in PER_CLASS_COLUMNS] for r in rows)
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another --out") from None


def score_report(classes: Sequence[str], targets, probs, thresholds) -> dict:
    """mAP, micro and macro F1 / precision / recall, and the per-class rows (weakest first), as
    JSON-ready values (NaN becomes None)."""
    y, s = as_arrays(targets, probs)
    t = thresholds.values if isinstance(thresholds, Thresholds) else thresholds
    decided = threshold_scores(y, s, t)
    rows = per_class_rows(classes, y, s, t)
    rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    report = {
        "map": mean_average_precision(y, s),
        "classes": len(classes),
        "classes_scored": int(decided.scored.sum()),
        "micro": {"f1": decided.micro_f1, "precision": decided.micro_precision, "recall": decided.micro_recall},
        "macro": {"f1": decided.macro_f1, "precision": decided.macro_precision, "recall": decided.macro_recall},
        "per_class": rows,
    }
    return json_ready(report)

