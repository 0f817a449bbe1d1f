"""A run folder read back as it is on disk (`load_run`), or summarised from the rows a Trainer holds
(`summarize_run`), and the per-class AP of its kept checkpoint.

A run folder (`runs/<recipe name>/<UTC timestamp>/`, see `layout`) is read also while it is still
training: `metrics.csv` and `recipe.toml` always, `run.json` (written by the Trainer after each
epoch) when it is there, `val_scores.csv` for the per-class AP. Every file is untrusted: a bad one
is a `UserError` naming it. This module imports neither torch nor matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aicoss_cli.base.checks import is_integer, is_number
from aicoss_cli.base.errors import UserError
from aicoss_cli.data.submission import ScoreTable, read_probabilities_csv
from aicoss_cli.data.tables import read_train
from aicoss_cli.evaluation.metrics import average_precision_per_class
from aicoss_cli.results.layout import (
    METRIC_COLUMNS,
    METRICS_FILE,
    RECIPE_FILE,
    RUN_FILE,
    RUN_FORMAT,
    VAL_SCORES_FILE,
    best_row,
    score,
)

N_WEAKEST = 5


# --------------------------------------------------------------------------- what a run holds


@dataclass
class Run:
    """One run folder, summarised. Times in seconds; `None` where the run did not record it."""

    run_dir: Path
    label: str  # "<recipe name> <timestamp>": what legends and tables call the run
    name: str
    arch: str
    img_size: int
    loss: str
    epochs: int  # planned
    epochs_done: int
    best_epoch: int
    best_val_map: float
    train_seconds: float
    train_img_per_s: float | None
    eval_img_per_s: float | None
    device: str | None
    precision: str
    status: str  # training | finished | stopped (run.json), or finished | incomplete (from metrics.csv)
    source: str  # "run.json" or "metrics.csv": where the summary numbers come from
    data_root: str
    val_fraction: float
    rows: list[dict[str, float]] = field(default_factory=list)  # metrics.csv, one dict per epoch

    def column(self, key: str) -> np.ndarray:
        return np.array([row.get(key, math.nan) for row in self.rows], dtype=np.float64)


@dataclass
class ClassAP:
    """Per-class AP of a run's best checkpoint on its own val split."""

    classes: list[str]
    ap: np.ndarray  # NaN: no positive in val
    positives: np.ndarray
    n_val: int

    @property
    def val_map(self) -> float:
        valid = ~np.isnan(self.ap)
        return float(self.ap[valid].mean()) if valid.any() else math.nan


# --------------------------------------------------------------------------- reading a run


def load_run(run_dir: str | Path) -> Run:
    """Summarise a run folder from metrics.csv and recipe.toml, and run.json when present.

    UserError (one line, naming the file) for a folder that is not a run, a run with no finished
    epoch, or a damaged file.
    """
    from aicoss_cli.recipe import recipe_from_toml

    run_dir = Path(run_dir)
    recipe_path, metrics_path = run_dir / RECIPE_FILE, run_dir / METRICS_FILE
    if not run_dir.is_dir() or not recipe_path.is_file():
        raise UserError(f"{run_dir}: not an aicoss run folder (it needs {RECIPE_FILE} and {METRICS_FILE}); "
                        "pass runs/<recipe name>/<timestamp>")
    if not metrics_path.is_file():
        raise UserError(f"{run_dir}: no finished epoch yet (no {METRICS_FILE}); report it after its first epoch")
    try:
        recipe_text = recipe_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{recipe_path}: cannot be read ({exc})") from None
    recipe = recipe_from_toml(recipe_text, str(recipe_path))
    rows = read_metrics(metrics_path)
    if not rows:
        raise UserError(f"{run_dir}: no finished epoch yet ({METRICS_FILE} has no rows); report it after its first "
                        "epoch")
    return summarize_run(run_dir, recipe, rows, read_run_json(run_dir / RUN_FILE))


def summarize_run(run_dir: Path, recipe, rows: list[dict[str, float]], info: dict[str, Any] | None = None) -> Run:
    """A `Run` from its resolved recipe, its metrics rows and, when known, its run.json values (what
    metrics.csv cannot say: speed, device, status). The Trainer's live curves call it with the rows
    it holds; `load_run` with the files. The best epoch is `layout.best_row`'s: the one
    best.safetensors holds."""
    best = best_row(rows)
    best_score = score(best)
    run = Run(
        run_dir=Path(run_dir), label=_run_label(recipe.name, Path(run_dir)), name=recipe.name, arch=recipe.model.arch,
        img_size=recipe.model.img_size, loss=recipe.loss.name, epochs=recipe.optim.epochs,
        epochs_done=int(rows[-1]["epoch"]),
        best_epoch=int(best["epoch"]), best_val_map=best_score if math.isfinite(best_score) else math.nan,
        train_seconds=float(sum(r["seconds"] for r in rows)), train_img_per_s=None, eval_img_per_s=None,
        device=recipe.runtime.device, precision=recipe.runtime.precision,
        status="finished" if int(rows[-1]["epoch"]) >= recipe.optim.epochs else "incomplete",
        source=METRICS_FILE, data_root=recipe.data.root, val_fraction=recipe.data.val_fraction, rows=list(rows),
    )
    if info is not None:  # what metrics.csv cannot say; its numbers stay the ones metrics.csv holds
        run.source = RUN_FILE
        for key in ("train_img_per_s", "eval_img_per_s", "device", "precision", "status"):
            if key in info:
                setattr(run, key, info[key])
    return run


def _run_label(name: str, run_dir: Path) -> str:
    return name if run_dir.name == name else f"{name} {run_dir.name}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows as floats (extra columns such as val_map_ema are kept); NaN is allowed (a
    diverged epoch), anything else that is not a number is an error naming the row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from None
    if not table:
        return []
    header = [h.strip() for h in table[0]]
    missing = [c for c in METRIC_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r} (expected {','.join(METRIC_COLUMNS)})")
    rows = []
    for number, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{path}: row {number} has {len(cells)} values for {len(header)} columns")
        row = {}
        for key, text in zip(header, cells):
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"{path}: row {number}, column {key!r}: {text[:40]!r} is not a number") from None
            if math.isinf(value) or (math.isnan(value) and key in ("epoch", "seconds")):
                raise UserError(f"{path}: row {number}, column {key!r}: {text[:40]!r} is not a finite number")
            row[key] = value
        if row["epoch"] < 1 or row["epoch"] != int(row["epoch"]) or row["seconds"] < 0:
            raise UserError(f"{path}: row {number}: epoch must be a whole number ≥ 1 and seconds ≥ 0")
        if rows and row["epoch"] <= rows[-1]["epoch"]:
            raise UserError(f"{path}: row {number}: epoch {int(row['epoch'])} does not follow epoch "
                            f"{int(rows[-1]['epoch'])}")
        rows.append(row)
    return rows


_RUN_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "arch": (str,), "loss": (str,), "device": (str,), "precision": (str,), "status": (str,),
    "epochs": (int,), "epochs_done": (int,), "best_epoch": (int,),
    "best_val_map": (int, float), "train_seconds": (int, float), "train_img_per_s": (int, float),
    "eval_img_per_s": (int, float, type(None)),
}


def read_run_json(path: Path) -> dict[str, Any] | None:
    """The Trainer's run.json, checked field by field; None when the file is absent."""
    if not path.is_file():
        return None
    data = read_json_object(path)
    if data.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: not an aicoss run summary (expected \"format\": \"{RUN_FORMAT}\")")
    out: dict[str, Any] = {}
    for key, types in _RUN_JSON_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise UserError(f"{path}: {key!r} has the wrong type (got {show(value)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{path}: {key!r} must be a finite number (got {show(value)})")
        if isinstance(value, (int, float)) and value < 0:
            raise UserError(f"{path}: {key!r} must not be negative (got {show(value)})")
        out[key] = float(value) if key in ("best_val_map", "train_seconds", "train_img_per_s") else value
    if "best_val_map" in out and out["best_val_map"] > 1:
        raise UserError(f"{path}: 'best_val_map' must be in [0, 1] (got {show(data['best_val_map'])})")
    return out


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; UserError naming the file (and the line) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_members_json(path: Path, fmt: str, what: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A result JSON (`what`, e.g. "ensemble result") of format `fmt` and its 'members': a non-empty
    list of objects, each field to be read with `checked_field`."""
    data = read_json_object(path)
    if data.get("format") != fmt:
        raise UserError(f"{path}: not an aicoss {what} (expected \"format\": \"{fmt}\")")
    members = data.get("members")
    if not isinstance(members, list) or not members:
        raise UserError(f"{path}: 'members' must be a non-empty list")
    for i, m in enumerate(members):
        if not isinstance(m, dict):
            raise UserError(f"{path}: members[{i}] must be an object")
    return data, members


# what a field of a result JSON must hold: a test and its wording; "X?" (in `checked_field`) also takes null
FIELD_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: is_integer(v) and v >= 0, "a whole number ≥ 0"),
    "pos": (lambda v: is_number(v) and v > 0, "a finite number > 0"),
    "nonneg": (lambda v: is_number(v) and v >= 0, "a finite number ≥ 0"),
    "unit": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}


def checked_field(where: dict[str, Any], key: str, kind: str, path: Path, prefix: str = "") -> Any:
    """where[key] as `kind` (a key of `FIELD_KINDS`, with "?" also null; numbers come back as float),
    else a UserError naming the file and the key (`prefix` + key, e.g. "members[2].weight")."""
    value, nullable, kind = where.get(key), kind.endswith("?"), kind.rstrip("?")
    if nullable and value is None:
        return None
    test, expected = FIELD_KINDS[kind]
    if not test(value):
        raise UserError(f"{path}: '{prefix}{key}' must be {'null or ' * nullable}{expected} (got {show(value)})")
    return float(value) if kind in ("pos", "nonneg", "unit") else value


def show(value: Any) -> str:
    """A value read from a file, as an error message quotes it (cut at 50 characters)."""
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) < 50 else text[:47] + "..."


# --------------------------------------------------------------------------- per-class AP


def class_ap(run: Run, data: str | Path | None = None) -> ClassAP:
    """Per-class AP of the run's best checkpoint, from its val_scores.csv and the labels of those
    img_ids in train.csv (data root: `data`, else the recipe's `[data] root`). No inference."""
    scores, targets, _ = val_labels(run, data)
    return ClassAP(classes=scores.classes, ap=average_precision_per_class(targets, scores.values),
                   positives=(targets > 0).sum(axis=0), n_val=len(scores.ids))


def val_labels(run: Run, data: str | Path | None = None) -> tuple[ScoreTable, np.ndarray, list[str]]:
    """The run's val_scores.csv, and in its rows and columns the labels (N, K) and the image paths
    of those img_ids in train.csv (data root: `data`, else the recipe's `[data] root`)."""
    scores_path = run.run_dir / VAL_SCORES_FILE
    if not scores_path.is_file():
        raise UserError(f"{scores_path}: not found (the Trainer writes it with the kept checkpoint)")
    scores = read_probabilities_csv(scores_path)
    classes, ids = scores.classes, scores.ids
    table = read_train(data if data is not None else run.data_root)
    unknown = [c for c in classes if c not in table.classes]
    if unknown:
        raise UserError(f"{scores_path}: class {unknown[0]!r} is not a column of {table.root / 'train.csv'}; "
                        "pass --data with the data this run trained on")
    row_of = {img_id: i for i, img_id in enumerate(table.ids)}
    missing = [(n, i) for n, i in zip(scores.lines, ids) if i not in row_of]
    if missing:
        raise UserError(f"{scores_path}: row {missing[0][0]}: img_id {missing[0][1]!r} is not in "
                        f"{table.root / 'train.csv'}; pass --data with the data this run trained on")
    rows = np.array([row_of[i] for i in ids])
    cols = np.array([table.classes.index(c) for c in classes])
    return scores, table.labels[np.ix_(rows, cols)], [table.paths[r] for r in rows]


def weakest(ap: np.ndarray, n: int = N_WEAKEST) -> list[int]:
    """Indices of the n lowest APs (NaN, a class without a positive, is never among them)."""
    order = [int(i) for i in np.argsort(ap, kind="stable") if not np.isnan(ap[i])]
    return order[:n]


# --------------------------------------------------------------------------- ensemble results


