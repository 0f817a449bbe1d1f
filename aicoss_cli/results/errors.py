"""Error analysis: where a model's scores and the known labels disagree, image by image.

The input is a `LabeledScores`: scores (N, K) and labels (N, K; 1, 0 or -1 = not annotated, left
out everywhere) of the same images, with each image's file. It comes from a run folder (its
val_scores.csv against train.csv, or its submission.csv against test_labels.csv) or from any
prediction CSV against a labels CSV, matched as `aicoss score` matches them (an `oof.csv` of a
cross-validation against train.csv is one). `analyse` computes, with numpy only: the per-class
table, the false positives and false negatives of the worst classes, the false positives'
co-occurring labels and the suspect labels. `read_thumbnails` decodes the few images a report
shows, through the one decoder, each once; an image that cannot be read is a note, never an error.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path
from aicoss_cli.data.submission import preview, read_csv_rows, read_labels_csv, read_probabilities_csv
from aicoss_cli.data.tables import image_paths
from aicoss_cli.evaluation.metrics import mean_average_precision, threshold_scores
from aicoss_cli.evaluation.score import matched_labels, per_class_rows
from aicoss_cli.evaluation.thresholds import Thresholds, parse_threshold_spec, resolve_thresholds
from aicoss_cli.results.layout import SUBMISSION_FILE, VAL_SCORES_FILE
from aicoss_cli.results.runs import Run, val_labels

SUSPECT_BELOW = 0.02  # a positive label scored below this is suspect
SUSPECT_ABOVE = 0.98  # a negative label scored above this is suspect
THUMB = 96  # thumbnail side in pixels, the size the decoder is asked for
SUSPECTS_FILE = "suspect_labels.csv"
SUSPECT_COLUMNS = ("rank", "img_id", "img_path", "class", "label", "score", "contradiction")
SUSPECTS_SHOWN = 30  # suspects with a thumbnail in report.html


@dataclass
class ErrorOptions:
    """What `aicoss report` takes for its error analysis (defaults: the options' defaults)."""

    labels: Path | None = None
    split: str = "val"
    classes: Sequence[str] = ()
    thresholds: str = "0.5"
    worst: int = 6
    per_row: int = 8
    suspect_below: float = SUSPECT_BELOW
    suspect_above: float = SUSPECT_ABOVE

    def asked(self) -> str | None:
        """The option that asks for an error analysis explicitly (None: only defaults)."""
        if self.labels is not None:
            return "--labels"
        if self.classes:
            return "--classes"
        return "--split test" if self.split == "test" else None


@dataclass
class LabeledScores:
    """Scores and known labels of the same images, rows in the scores file's order."""

    source: str  # what was scored, as a sentence names it
    ids: list[str]
    classes: list[str]
    scores: np.ndarray  # (N, K) float64 in [0, 1]
    targets: np.ndarray  # (N, K) int8: 1, 0, -1 (not annotated)
    paths: list[str | None]  # absolute image paths; None where no img_path is known
    split: str | None = None  # a run's "val" or "test"; None for a prediction CSV


# --------------------------------------------------------------------------- inputs


def run_scores(run: Run, root: Path, split: str) -> LabeledScores:
    """A run's kept checkpoint on its val split (val_scores.csv, labels from train.csv) or on the
    test split (submission.csv against test_labels.csv)."""
    if split == "val":
        scores, targets, paths = val_labels(run, root)
        return LabeledScores(f"the val split of {run.label}", scores.ids, scores.classes, scores.values, targets,
                             list(paths), "val")
    submission, labels = run.run_dir / SUBMISSION_FILE, Path(root) / "test_labels.csv"
    if not submission.is_file():
        raise UserError(f"{submission}: not found (the Trainer writes it when the run ends); use --split val")
    if not labels.is_file():
        raise UserError(f"{labels}: not found: the test split of {root} has no known labels; use --split val")
    data = csv_scores(submission, labels, root)
    data.source, data.split = f"the test split of {run.label}", "test"
    return data


def csv_scores(predictions: Path, labels: Path, root: Path | None) -> LabeledScores:
    """A prediction CSV against a labels CSV (rows matched by img_id, columns by name, as `aicoss
    score` does). Image files: img_path of the data root's CSVs, else the labels file's own
    img_path column (relative to `root`, default the labels file's folder)."""
    pred, truth = read_probabilities_csv(predictions), read_labels_csv(labels)
    targets = matched_labels(pred, truth)
    root = Path(root) if root is not None else Path(labels).parent
    known = image_paths(root) if root.is_dir() else {}
    own = _own_image_paths(Path(labels), root)
    paths = [known.get(i) or own.get(i) for i in pred.ids]
    return LabeledScores(f"{pred.path} against {truth.path}", pred.ids, pred.classes, pred.values, targets, paths)


def _own_image_paths(labels: Path, root: Path) -> dict[str, str]:
    """img_id -> image path from the labels file's img_path column (paths leaving `root` are left out)."""
    header, rows = read_csv_rows(labels, "labels CSV")
    if "img_path" not in header:
        return {}
    id_col, path_col = header.index("img_id"), header.index("img_path")
    base = os.path.abspath(root)
    out = {}
    for _, row in rows:
        full = os.path.normpath(os.path.join(base, row[path_col]))
        if row[path_col].strip() and full.startswith(base + os.sep):
            out[row[id_col]] = full
    return out


def prediction_source(sources: Sequence[str | Path]) -> tuple[Path | None, list[Path]]:
    """`aicoss report`'s positional arguments: one prediction CSV (a file), or run folders."""
    sources = [Path(p) for p in sources]
    csvs = [p for p in sources if p.is_file() or p.suffix.lower() == ".csv"]
    if csvs and len(sources) > 1:
        raise UserError(f"{csvs[0]}: a prediction CSV is reported alone (with --labels); report the run folders in "
                        "another call")
    return (csvs[0], []) if csvs else (None, sources)


def error_source(runs: Sequence[Run], predictions: Path | None, options: ErrorOptions,
                 data: str | Path | None) -> LabeledScores | None:
    """What the error analysis scores: the prediction CSV against --labels, or the one run's split;
    None where no labels are known and no option asked for the analysis."""
    if predictions is not None:
        if options.labels is None:
            raise UserError(f"{predictions}: name its labels with --labels FILE (the data root's train.csv for "
                            "an oof.csv, test_labels.csv for a test submission)")
        if options.split != "val":
            raise UserError("--split picks a run's scores; a prediction CSV is scored against its --labels")
        return csv_scores(predictions, options.labels, None if data is None else Path(data))
    if options.labels is not None:
        raise UserError("--labels goes with a prediction CSV (aicoss report PRED.csv --labels FILE); a run's "
                        "labels come from its data root (--data)")
    asked = options.asked()
    if len(runs) != 1:
        if asked:
            raise UserError(f"{asked}: the error analysis takes one run folder or one prediction CSV "
                            f"(got {len(runs)} runs)")
        return None
    run = runs[0]
    root = Path(data) if data is not None else Path(run.data_root)
    if options.split == "val" and not ((run.run_dir / VAL_SCORES_FILE).is_file() and (root / "train.csv").is_file()):
        if asked:
            raise UserError(f"{asked}: {run.run_dir} has no val_scores.csv, or {root} no train.csv: no known labels "
                            "to analyse; pass --data with the data this run trained on")
        return None  # the report's note says why
    return run_scores(run, root, options.split)


def pick_classes(values: Sequence[str], classes: Sequence[str]) -> list[int]:
    """--classes a,b (repeatable): a value that is a class name is taken whole (names may hold
    commas), any other is split on commas; each name must be a class."""
    index = {c: j for j, c in enumerate(classes)}
    picked: list[int] = []
    for value in values:
        names = [value] if value in index else [v.strip() for v in value.split(",") if v.strip()]
        for name in names:
            if name not in index:
                raise UserError(f"--classes: {name!r} is not a class of these scores ({preview(classes)})")
            if index[name] not in picked:
                picked.append(index[name])
    return picked


# --------------------------------------------------------------------------- the analysis (numpy)


def false_positives(targets, scores, thresholds, cls: int, n: int) -> tuple[np.ndarray, int]:
    """The n highest-scored false positives of class `cls` (label 0, score ≥ its threshold),
    highest first, ties in row order; and how many there are."""
    y, s = np.asarray(targets)[:, cls], np.asarray(scores)[:, cls]
    rows = np.flatnonzero((y == 0) & (s >= thresholds[cls]))
    return rows[np.argsort(-s[rows], kind="stable")][:n], len(rows)


def false_negatives(targets, scores, thresholds, cls: int, n: int) -> tuple[np.ndarray, int]:
    """The n lowest-scored false negatives of class `cls` (label 1, score < its threshold), lowest
    first, ties in row order; and how many there are."""
    y, s = np.asarray(targets)[:, cls], np.asarray(scores)[:, cls]
    rows = np.flatnonzero((y == 1) & (s < thresholds[cls]))
    return rows[np.argsort(s[rows], kind="stable")][:n], len(rows)


def fp_cooccurrence(targets, scores, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label's confusion matrix. pairs[j, i] = #{n : n is a false positive of j (y_nj = 0,
    s_nj ≥ t_j) and y_ni = 1}: the true labels of class j's false positives; alone[j] = #{false
    positives of j whose image has no positive label}."""
    y, s = np.asarray(targets), np.asarray(scores)
    fp = (y == 0) & (s >= np.asarray(thresholds))
    positive = y == 1
    # float32 BLAS: exact for counts below 2^24, and far faster than an integer matmul
    pairs = np.rint(fp.T.astype(np.float32) @ positive.astype(np.float32)).astype(np.int64)
    alone = (fp & ~positive.any(axis=1, keepdims=True)).sum(axis=0)
    return pairs, alone


def suspect_labels(targets, scores, below: float, above: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, classes) of the labels the scores contradict with confidence: a positive scored <
    below, or a negative scored > above (not annotated: never). Sorted by contradiction (1 − s for
    a positive, s for a negative), highest first, ties by row then class."""
    y, s = np.asarray(targets), np.asarray(scores)
    rows, cols = np.nonzero(((y == 1) & (s < below)) | ((y == 0) & (s > above)))
    contradiction = np.where(y[rows, cols] == 1, 1.0 - s[rows, cols], s[rows, cols])
    order = np.argsort(-contradiction, kind="stable")
    return rows[order], cols[order]


@dataclass
class ClassErrors:
    """One class's gallery: its false positives (highest score first) and false negatives (lowest
    first), at most as many as the picture shows, and how many there are in all."""

    cls: int
    fp: list[int]
    fn: list[int]
    n_fp: int
    n_fn: int


@dataclass
class ErrorAnalysis:
    data: LabeledScores
    thresholds: Thresholds
    per_class: list[dict]  # evaluation.score.per_class_rows + fp, fn (counts), in class order
    map: float
    macro_f1: float
    worst: list[ClassErrors]  # errors.png: the worst classes by AP, worst first
    requested: list[ClassErrors]  # --classes: one picture each
    pairs: np.ndarray
    alone: np.ndarray
    suspects: tuple[np.ndarray, np.ndarray]
    options: ErrorOptions
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)  # row -> (S, S, 3) uint8
    unreadable: dict[int, str] = field(default_factory=dict)  # row -> why its image could not be shown
    notes: list[str] = field(default_factory=list)

    def shown_rows(self) -> list[int]:
        """Every image a picture or the page shows, once each."""
        rows = [r for g in self.worst + self.requested for r in g.fp + g.fn]
        rows += [int(r) for r in self.suspects[0][:SUSPECTS_SHOWN]]
        return list(dict.fromkeys(rows))


def analyse(data: LabeledScores, options: ErrorOptions) -> ErrorAnalysis:
    """Every number of the error analysis (no image read). Bad thresholds or --classes: UserError."""
    y, s = data.targets, data.scores
    requested = pick_classes(options.classes, data.classes)
    spec = parse_threshold_spec(options.thresholds, "--thresholds")
    thresholds = resolve_thresholds(spec, data.classes, y, s, option="--thresholds")
    notes = []
    if spec == "auto":
        notes.append("--thresholds auto fits each class's threshold on the same images it then counts errors on "
                     "(in-sample): the F1 and the error counts are optimistic")
    t = thresholds.values
    rows = per_class_rows(data.classes, y, s, t)
    decided = threshold_scores(y, s, t)
    for j, row in enumerate(rows):
        row["fp"], row["fn"] = int(decided.fp[j]), int(decided.fn[j])
    ranked = sorted((j for j, r in enumerate(rows) if r["rank"] is not None), key=lambda j: rows[j]["rank"])

    def gallery(j: int, n: int) -> ClassErrors:
        fp, n_fp = false_positives(y, s, t, j, n)
        fn, n_fn = false_negatives(y, s, t, j, n)
        return ClassErrors(j, fp.tolist(), fn.tolist(), n_fp, n_fn)

    pairs, alone = fp_cooccurrence(y, s, t)
    return ErrorAnalysis(
        data=data, thresholds=thresholds, per_class=rows, map=mean_average_precision(y, s), macro_f1=decided.macro_f1,
        worst=[gallery(j, options.per_row) for j in ranked[:options.worst]],
        requested=[gallery(j, 3 * options.per_row) for j in requested], pairs=pairs, alone=alone,
        suspects=suspect_labels(y, s, options.suspect_below, options.suspect_above), options=options, notes=notes)


# --------------------------------------------------------------------------- images


def read_thumbnails(analysis: ErrorAnalysis, size: int = THUMB) -> None:
    """Decode every image the report shows, once, at `size` (the one decoder); an image that is
    missing or broken is recorded in `unreadable` and named in a note."""
    rows = analysis.shown_rows()
    for row in rows:
        path = analysis.data.paths[row]
        if path is None:
            analysis.unreadable[row] = "no img_path known for this img_id"
        elif not os.path.isfile(path):
            analysis.unreadable[row] = "missing"
        else:
            from aicoss_cli.data.images import decode_batch  # torch: imported only when there is an image

            batch, error = decode_batch([path], [size])
            if error:
                analysis.unreadable[row] = error.removeprefix(f"{path}: ")
            else:
                analysis.thumbs[row] = batch[0][0].permute(1, 2, 0).numpy()
    if analysis.unreadable:
        row, why = next(iter(analysis.unreadable.items()))
        where = analysis.data.paths[row] or analysis.data.ids[row]
        analysis.notes.append(f"{len(analysis.unreadable)} of the {len(rows)} images the report shows could not be "
                              f"read (first: {where}: {why}); they are drawn as grey boxes, and every number, "
                              f"curve and {SUSPECTS_FILE} is complete without them")


# --------------------------------------------------------------------------- files


def suspect_rows(analysis: ErrorAnalysis) -> list[list]:
    """suspect_labels.csv's rows (SUSPECT_COLUMNS), most confident contradiction first."""
    d = analysis.data
    out = []
    for rank, (r, c) in enumerate(zip(*analysis.suspects), start=1):
        label, score = int(d.targets[r, c]), float(d.scores[r, c])
        out.append([rank, d.ids[r], d.paths[r] or "", d.classes[c], label, repr(score),
                    repr(1.0 - score if label == 1 else score)])
    return out


def write_suspects(path: Path, analysis: ErrorAnalysis) -> Path:
    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(SUSPECT_COLUMNS)
            writer.writerows(suspect_rows(analysis))
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another --out") from None
    return path


def is_suspects_csv(path: Path) -> bool:
    """A file this module wrote: its first line is SUSPECT_COLUMNS."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == list(SUSPECT_COLUMNS)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def class_picture_names(classes: Sequence[str], picked: Sequence[int]) -> dict[int, str]:
    """errors_<name>.png per --classes class: the name in letters, digits, - and _ (cut at 40),
    with the column number where that is empty or taken."""
    names: dict[int, str] = {}
    for j in picked:
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", classes[j]).strip("_")[:40]
        name = f"errors_{slug}.png" if slug else f"errors_class{j + 1}.png"
        if name in names.values():
            name = f"errors_{slug}_{j + 1}.png"
        names[j] = name
    return names


def error_files(analysis: ErrorAnalysis) -> dict[str, str]:
    """The files the error analysis writes into the report's folder (key -> file name)."""
    files = {"errors": "errors.png", "pr_curves": "pr_curves.png", "cooccurrence": "cooccurrence.png",
             "suspect_labels": SUSPECTS_FILE}
    names = class_picture_names(analysis.data.classes, [g.cls for g in analysis.requested])
    files.update({f"errors_{j}": name for j, name in names.items()})
    return files


def error_json(analysis: ErrorAnalysis) -> dict:
    """The analysis's summary for `aicoss report --json`."""
    d = analysis.data
    return {
        "source": d.source, "split": d.split, "images": len(d.ids), "classes": len(d.classes), "map": analysis.map,
        "macro_f1": analysis.macro_f1, "thresholds": analysis.thresholds.source,
        "worst_classes": [{"class": d.classes[g.cls], "ap": analysis.per_class[g.cls]["ap"], "false_positives": g.n_fp,
                           "false_negatives": g.n_fn} for g in analysis.worst],
        "suspects": len(analysis.suspects[0]), "suspect_below": analysis.options.suspect_below,
        "suspect_above": analysis.options.suspect_above,
        "unreadable_images": {d.ids[r]: why for r, why in analysis.unreadable.items()},
    }
