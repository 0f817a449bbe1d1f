"""Scores CSVs: `img_id` + one column per class, the shape of a submission. One writer
(`write_scores_csv`: submissions, val_scores.csv, predictions) and one reader for probabilities and
one for 0/1/-1 labels (`aicoss score`, the report's per-class AP), and the CSV-cell checks they
share with the other small CSVs (thresholds). Every file read is untrusted: a bad cell is a
one-line error naming the file, row and column.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path

if TYPE_CHECKING:
    import torch


def write_scores_csv(path, ids: Sequence[str], classes: Sequence[str], probs: torch.Tensor | np.ndarray) -> None:
    """img_id + one probability column per class, written atomically; UserError if it cannot be."""
    import pandas as pd

    values = probs.numpy() if hasattr(probs, "numpy") else np.asarray(probs)  # a tensor, without importing torch
    bad = ~np.isfinite(values)
    if bad.any():  # an empty cell in a submission scores as nothing: never write one
        row, col = map(int, np.argwhere(bad)[0])
        raise UserError(f"{path}: not written: {int(bad.sum())} of {values.size} probabilities are not finite (first: "
                        f"img_id {ids[row]!r}, class {classes[col]!r}); the model's weights or outputs are NaN or "
                        "infinite: check the checkpoint (did its run stop on a non-finite loss?) or run in fp32")
    frame = pd.DataFrame(values, columns=list(classes))
    frame.insert(0, "img_id", list(ids))
    try:
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.7g")
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc})") from None


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
        what = "is empty" if not raw.strip() else f"{raw!r} is not one of 1, 0, -1"
        raise UserError(f"{path}: row {line}, column {column!r}: label {what} (1 = present, 0 = absent, "
                        "-1 = not annotated)")
    return value


def read_csv_rows(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Raw header (class names as written, `img_id` / `img_path` stripped; duplicates and empty
    names refused) and the non-blank rows with their line numbers, each with as many fields as the
    header."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not header:
        raise UserError(f"{path}: empty file; a {what} starts with a header line")
    header = [name.strip() if name.strip() in ("img_id", "img_path") else name for name in header]
    seen: set[str] = set()
    for c, name in enumerate(header):
        if not name.strip():
            raise UserError(f"{path}: column {c + 1} of the header has no name")
        if name in seen:
            raise UserError(f"{path}: duplicated column {name!r} in the header; each column once")
        seen.add(name)
    for line, row in rows:
        if len(row) != len(header):
            raise UserError(f"{path}: row {line} has {len(row)} fields but the header has {len(header)}")
    return header, rows


def probability_cell(raw: str, path: Path, line: int, column: str, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{path}: row {line}, column {column!r}: {raw!r} is not a number; {what} is a number "
                        "in [0, 1]") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise UserError(f"{path}: row {line}, column {column!r}: {raw.strip()!r} is not in [0, 1]: not {what} "
                        "(a finite number in [0, 1])")
    return value


def preview(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")
