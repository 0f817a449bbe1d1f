"""What a run folder holds: every file name and column in one place, what makes a folder a run,
and the one definition of an epoch's score and of the best epoch.

    runs/<recipe name>/<UTC timestamp>/
        recipe.toml              the resolved recipe (written first: it makes the folder a run)
        metrics.csv              one row per epoch: METRIC_COLUMNS (+ val_map_ema with an EMA)
        best.safetensors         the best epoch's weights (`best_row`)
        last.safetensors         the last epoch's weights
        epochNN.safetensors      the k best epochs' weights ([runtime] keep_top)
        val_scores.csv           the kept checkpoint's val probabilities
        submission.csv           the kept checkpoint's test probabilities
        train_state.safetensors  everything `--resume` needs
        run.json                 the run's summary (speed, device, status), for `aicoss report`
        distill.json             a distilled run's teachers: files, weights, val mAP and img/s
        distill_cache.safetensors  the teachers' probabilities ([distill] mode = "cached")
        curves.png, prior.csv, mlflow_run.json, .aicoss.lock

    runs/<recipe name>/<UTC timestamp>-cvK/     a K-fold cross-validation (`aicoss train --folds K`)
        cv_recipe.toml           the resolved recipe with [data] folds = K (written first: it makes the
                                 folder a CV parent)
        fold0/ ... fold{K-1}/    one run folder per fold, as above ([data] fold = k)
        oof.csv                  every train image's probabilities from the fold model that did not
                                 train on it, in train.csv's row order
        cv.json                  per-fold val mAP, their mean and std, the OOF mAP
        submission.csv           the mean of the K kept checkpoints' test probabilities

This module imports neither torch nor anything of aicoss above `base`.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Sequence

RECIPE_FILE = "recipe.toml"
METRICS_FILE = "metrics.csv"
BEST_FILE = "best.safetensors"
LAST_FILE = "last.safetensors"
VAL_SCORES_FILE = "val_scores.csv"
SUBMISSION_FILE = "submission.csv"
STATE_FILE = "train_state.safetensors"
RUN_FILE = "run.json"
CURVES_FILE = "curves.png"
PRIOR_FILE = "prior.csv"
DISTILL_FILE = "distill.json"  # results.distillation
DISTILL_CACHE_FILE = "distill_cache.safetensors"
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run id of this run folder, so a resumed run continues it
LOCK_FILE = ".aicoss.lock"
# what a fork (`--resume RUN --out DIR`) copies into its new folder before it continues
RUN_FILES = (METRICS_FILE, BEST_FILE, LAST_FILE, VAL_SCORES_FILE, PRIOR_FILE, CURVES_FILE)
KEEP_FILES = {"best": BEST_FILE, "last": LAST_FILE}

CV_RECIPE_FILE = "cv_recipe.toml"
OOF_FILE = "oof.csv"
CV_FILE = "cv.json"
CV_FORMAT = "aicoss-cv/1"  # cv.json
CV_SUFFIX = "-cv"  # a CV parent is <timestamp>-cvK

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_map", "seconds")
EMA_COLUMN = "val_map_ema"

RUN_FORMAT = "aicoss-run/1"  # run.json
ENSEMBLE_FORMAT = "aicoss-ensemble-result/1"  # the JSON `aicoss ensemble` writes beside its CSV
DISTILL_FORMAT = "aicoss-distill/1"  # distill.json


def is_run_dir(folder: str | Path) -> bool:
    """A folder `aicoss train` made: it holds recipe.toml (written before the first step), or at
    least its best checkpoint (a run folder whose recipe was lost still holds a model)."""
    folder = Path(folder)
    return (folder / RECIPE_FILE).is_file() or (folder / BEST_FILE).is_file()


def is_cv_dir(folder: str | Path) -> bool:
    """A K-fold cross-validation parent folder (`aicoss train --folds K`): it holds cv_recipe.toml."""
    return (Path(folder) / CV_RECIPE_FILE).is_file()


def fold_dir(parent: str | Path, fold: int) -> Path:
    """The run folder of fold k inside a CV parent: PARENT/fold{k}."""
    return Path(parent) / f"fold{fold}"


def has_epochs(folder: str | Path) -> bool:
    """A run folder `aicoss report` can read: its recipe.toml and a metrics.csv (an epoch finished)."""
    return (Path(folder) / RECIPE_FILE).is_file() and (Path(folder) / METRICS_FILE).is_file()


def score(row: dict[str, Any]) -> float:
    """An epoch's score: the better val mAP of its raw and EMA weights (the weights its checkpoint
    holds); -inf for NaN or missing, which never beats a number."""
    return max(_finite(row.get("val_map")), _finite(row.get(EMA_COLUMN)))


def _finite(value: float | None) -> float:
    if value is None:
        return -math.inf
    value = float(value)
    return -math.inf if math.isnan(value) else value


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best epoch's metrics row: the highest `score`, the first of equal ones; the first epoch
    when none has a score (so a run always has a best checkpoint). This is the epoch whose weights
    best.safetensors holds, what `report`, ensemble discovery and `tune` take as the run's best."""
    if not rows:
        raise ValueError("no epoch")
    best = rows[0]
    for row in rows[1:]:
        if score(row) > score(best):
            best = row
    return best


def uses_ema(row: dict[str, Any]) -> bool:
    """Whether the epoch's checkpoint holds the EMA weights (they scored strictly better)."""
    ema = row.get(EMA_COLUMN)
    return ema is not None and _finite(ema) > _finite(row["val_map"])


def epoch_file(epoch: int, epochs: int) -> str:
    """epoch03.safetensors (at least two digits, as many as the last epoch needs)."""
    return f"epoch{epoch:0{max(2, len(str(epochs)))}d}.safetensors"


def kept_file(run_dir: str | Path, keep: str) -> Path:
    """The checkpoint that wrote the run's submission: best.safetensors or last.safetensors."""
    return Path(run_dir) / KEEP_FILES[keep]


def run_keep(run_dir: str | Path) -> str:
    """The run's `[runtime] keep` ("best" when its recipe.toml does not say or cannot be read)."""
    try:
        text = (Path(run_dir) / RECIPE_FILE).read_text(encoding="utf-8")
        keep = tomllib.loads(text).get("runtime", {}).get("keep")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return "best"
    return keep if keep in KEEP_FILES else "best"
