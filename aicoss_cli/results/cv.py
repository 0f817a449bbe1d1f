"""A K-fold cross-validation folder (`aicoss train --folds K`, see `layout`) read back: its plan
(cv_recipe.toml), which folds are done, and, once all K are, the out-of-fold (OOF) predictions
assembled from the folds' val_scores.csv with the per-fold and OOF mAP (`load_cv`), and the
summary `cv.json`. No inference and no torch: every number comes from files the folds wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.data.splits import split_fingerprint
from aicoss_cli.data.submission import read_probabilities_csv
from aicoss_cli.data.tables import read_train
from aicoss_cli.evaluation.metrics import average_precision_per_class, mean_average_precision
from aicoss_cli.results.layout import (
    CV_FORMAT,
    CV_RECIPE_FILE,
    OOF_FILE,
    SUBMISSION_FILE,
    VAL_SCORES_FILE,
    fold_dir,
    is_cv_dir,
    kept_file,
    run_keep,
)


@dataclass
class CvPlan:
    """What a CV parent was started with: the resolved recipe, `[data] folds` = K."""

    parent: Path
    recipe: Any  # aicoss_cli.recipe.Recipe

    @property
    def folds(self) -> int:
        return int(self.recipe.data.folds)

    def fold_dir(self, k: int) -> Path:
        return fold_dir(self.parent, k)


def read_plan(parent: str | Path) -> CvPlan:
    """The plan of a CV parent; UserError for a folder that is not one, or a damaged cv_recipe.toml."""
    from aicoss_cli.recipe import recipe_from_toml

    parent = Path(parent)
    if not is_cv_dir(parent):
        raise UserError(f"{parent}: not a cross-validation folder (no {CV_RECIPE_FILE}); pass the folder "
                        "`aicoss train --folds K` made, runs/<name>/<timestamp>-cvK")
    path = parent / CV_RECIPE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__})") from None
    recipe = recipe_from_toml(text, str(path))
    if recipe.data.folds is None or recipe.data.fold is not None:
        raise UserError(f"{path}: a CV plan sets [data] folds and no fold; the file was edited: restore it")
    return CvPlan(parent, recipe)


def fold_missing(run_dir: Path) -> str | None:
    """What a fold still lacks to be done (None when done): its kept checkpoint, val_scores.csv, and
    submission.csv, which a run writes last."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "not started"
    for path in (kept_file(run_dir, run_keep(run_dir)), run_dir / VAL_SCORES_FILE, run_dir / SUBMISSION_FILE):
        if not path.is_file():
            return f"no {path.name}"
    return None


@dataclass
class CvFolds:
    """A finished cross-validation: every train image's OOF probabilities (train.csv's row order)
    and the fold that held it out, the kept checkpoint of each fold, and the scores."""

    plan: CvPlan
    root: Path
    classes: list[str]
    ids: list[str]
    targets: np.ndarray  # (N, C) int8 in {-1, 0, 1}
    oof: np.ndarray  # (N, C) float64
    fold_of: np.ndarray  # (N,) the fold whose model did not train on the row
    checkpoints: list[Path]
    fingerprints: list[str]  # of each fold's val ids (`data.splits.split_fingerprint`)

    @property
    def folds(self) -> int:
        return self.plan.folds

    @cached_property
    def fold_maps(self) -> list[float]:
        """Each fold's val mAP: its kept checkpoint on the fold it held out."""
        return [mean_average_precision(self.targets[self.fold_of == k], self.oof[self.fold_of == k])
                for k in range(self.folds)]

    @cached_property
    def oof_map(self) -> float:
        """mAP over all N rows at once (the folds' models ranked together, so it also pays for their
        differences in calibration: it is not the mean of the fold mAPs)."""
        return mean_average_precision(self.targets, self.oof)

    def fold_class_ap(self) -> np.ndarray:
        """(K, C) per-class AP of each fold on its own rows (NaN: no positive in that fold)."""
        return np.stack([average_precision_per_class(self.targets[self.fold_of == k], self.oof[self.fold_of == k])
                         for k in range(self.folds)])

    def oof_class_ap(self) -> np.ndarray:
        return average_precision_per_class(self.targets, self.oof)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the fold scores."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def load_cv(parent: str | Path, data: str | Path | None = None) -> CvFolds:
    """A finished CV parent: its OOF probabilities from the folds' val_scores.csv, checked against the
    train.csv under `data` (default: the plan's `[data] root`) so that every row is held out by
    exactly one fold. UserError, naming the fold and the fix, when a fold is not done."""
    plan = read_plan(parent)
    checkpoints = []
    for k in range(plan.folds):
        missing = fold_missing(plan.fold_dir(k))
        if missing:
            raise UserError(f"{plan.parent}: fold {k} of {plan.folds} is not finished ({plan.fold_dir(k)}: {missing}); "
                            f"train it with `aicoss train --resume {plan.parent}` (all unfinished folds) or "
                            f"`--resume {plan.parent} --fold {k}`")
        checkpoints.append(kept_file(plan.fold_dir(k), run_keep(plan.fold_dir(k))))
    root = Path(data) if data is not None else Path(plan.recipe.data.root)
    table = read_train(root)
    csv = table.root / "train.csv"
    row_of = {img_id: i for i, img_id in enumerate(table.ids)}
    oof = np.full((len(table), len(table.classes)), np.nan)
    fold_of = np.full(len(table), -1, dtype=np.int64)
    fingerprints = []
    for k in range(plan.folds):
        scores = read_probabilities_csv(plan.fold_dir(k) / VAL_SCORES_FILE)
        if scores.classes != table.classes:
            raise UserError(f"{scores.path}: its classes differ from those of {csv}; pass the --data it trained on")
        rows = []
        for line, img_id in zip(scores.lines, scores.ids):
            row = row_of.get(img_id)
            if row is None:
                raise UserError(f"{scores.path}: row {line}: img_id {img_id!r} is not in {csv}; pass the --data "
                                "it trained on")
            if fold_of[row] >= 0:
                raise UserError(f"{scores.path}: row {line}: img_id {img_id!r} is also held out by fold "
                                f"{fold_of[row]}; the folds overlap: was a fold trained on another train.csv?")
            rows.append(row)
        oof[rows] = scores.values
        fold_of[rows] = k
        fingerprints.append(split_fingerprint(table.ids, np.asarray(rows)))
    if (fold_of < 0).any():
        first = int(np.flatnonzero(fold_of < 0)[0])
        raise UserError(f"{csv}: img_id {table.ids[first]!r} is held out by none of the {plan.folds} folds "
                        f"({int((fold_of < 0).sum())} rows in all); pass the --data the folds trained on")
    return CvFolds(plan, table.root, table.classes, table.ids, table.labels, oof, fold_of, checkpoints, fingerprints)


def cv_json(cv: CvFolds, submission: Path | None, n_test: int, seconds: float) -> dict[str, Any]:
    """cv.json: the plan, each fold's val mAP and its files, their mean and sample std, the OOF mAP."""
    maps = cv.fold_maps
    mean, std = mean_std(maps)
    r = cv.plan.recipe
    folds = [{"fold": k, "run_dir": cv.plan.fold_dir(k).name, "checkpoint": f"{cv.plan.fold_dir(k).name}/"
              f"{cv.checkpoints[k].name}", "n_val": int((cv.fold_of == k).sum()), "val_map": maps[k],
              "val_fingerprint": cv.fingerprints[k]} for k in range(cv.folds)]
    return json_ready({
        "format": CV_FORMAT, "name": r.name, "folds": cv.folds, "split_seed": r.data.split_seed,
        "data_root": str(cv.root), "n_rows": len(cv.ids), "n_test": n_test, "classes": cv.classes,
        "fold_val_map": folds, "mean_val_map": mean, "std_val_map": std, "oof_map": cv.oof_map,
        "oof_csv": OOF_FILE, "submission": None if submission is None else submission.name,
        "summary_seconds": round(seconds, 3),
    })
