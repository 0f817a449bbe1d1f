"""`aicoss score`: a submission-shaped CSV against a labels CSV, rows matched by img_id.

Both files are untrusted: a missing, extra or duplicated id, another class set, a duplicated
column, or a value that is not a probability (or a label in {-1, 0, 1}) is a one-line error naming
the file, line and column. This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aicoss_cli.errors import UserError
from aicoss_cli.thresholds import (DEFAULT_THRESHOLD, parse_threshold_spec, preview, probability_cell, read_csv_rows,
                                   resolve_thresholds, score_report)


@dataclass
class ScoreTable:
    """A submission-shaped CSV: ids, class names, values (N, K) in file order."""

    path: Path
    ids: list[str]
    classes: list[str]
    values: np.ndarray
    lines: list[int]   # the file line of each row, for messages


def read_probabilities_csv(path: Path) -> ScoreTable:
    """img_id + one probability column per class; every value a finite number in [0, 1]."""
    return _read_score_table(Path(path), "predictions CSV", labels=False)


def read_labels_csv(path: Path) -> ScoreTable:
    """img_id (+ an optional img_path, ignored) + one column per class with 1, 0 or -1 (not
    annotated: left out of every metric)."""
    return _read_score_table(Path(path), "labels CSV", labels=True)


def score_files(predictions: Path, labels: Path, thresholds: str = str(DEFAULT_THRESHOLD),
                option: str = "--thresholds") -> dict:
    """`aicoss score`: match the rows by img_id (any order) and the class columns by name, then
    `score_report` at the thresholds (a number or a class,threshold CSV)."""
    spec = parse_threshold_spec(thresholds, option)  # a bad spec fails before any file is read
    pred = read_probabilities_csv(predictions)
    truth = read_labels_csv(labels)
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
    targets = truth.values[[truth_row[i] for i in pred.ids]][:, columns]
    resolved = resolve_thresholds(spec, pred.classes, option=option)
    report = score_report(pred.classes, targets, pred.values, resolved)
    return {"predictions": str(pred.path), "labels": str(truth.path), "images": len(pred.ids),
            "thresholds": resolved.source, **report}


def _read_score_table(path: Path, what: str, labels: bool) -> ScoreTable:
    header, rows = read_csv_rows(path, what)
    if "img_id" not in header:
        raise UserError(f"{path}: no img_id column (found: {preview(header)}); a {what} has img_id and one "
                        "column per class")
    id_col = header.index("img_id")
    class_cols = [c for c, name in enumerate(header) if name not in ("img_id", "img_path")]
    if not class_cols:
        raise UserError(f"{path}: no class columns besides img_id")
    classes = [header[c] for c in class_cols]
    if not rows:
        raise UserError(f"{path}: no rows")
    ids, lines, seen = [], [], {}
    values = np.empty((len(rows), len(class_cols)), dtype=np.float64)
    for r, (line, row) in enumerate(rows):
        img_id = row[id_col]
        if not img_id.strip():
            raise UserError(f"{path}: row {line}: empty img_id")
        if img_id in seen:
            raise UserError(f"{path}: row {line}: duplicate img_id {img_id!r} (also row {seen[img_id]}); ids must be unique")
        seen[img_id] = line
        ids.append(img_id)
        lines.append(line)
        for k, c in enumerate(class_cols):
            values[r, k] = (_label(row[c], path, line, header[c]) if labels
                            else probability_cell(row[c], path, line, header[c], "a probability"))
    return ScoreTable(path, ids, classes, values.astype(np.int8) if labels else values, lines)


def _label(raw: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value not in (-1.0, 0.0, 1.0):
        raise UserError(f"{path}: row {line}, column {column!r}: label {raw!r} is not one of 1, 0, -1 "
                        "(1 = present, 0 = absent, -1 = not annotated)")
    return value
