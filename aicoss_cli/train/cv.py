"""K-fold cross-validation around the one training loop: `aicoss train RECIPE --folds K`.

    from aicoss_cli.train.cv import run_cv, start_cv
    result = run_cv(start_cv(recipe, out="runs"))   # recipe: resolved, with [data] folds = K

A fold is a normal run (`Trainer`) whose split is fold k (`[data] fold = k` in its recipe), written
to PARENT/fold{k}/ in the CV parent runs/<name>/<timestamp>-cvK/ (its files: `results.layout`).
`run_cv` trains the folds that are not done, in order (a killed fold resumes where it stopped); once
all K are, `summarize` writes the parent's oof.csv (the folds' val_scores.csv, no inference),
cv.json, and submission.csv: the mean of the K kept checkpoints on the test set through the one
forward loop, which is what `aicoss ensemble` of those K checkpoints with equal weights writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aicoss_cli.base import distributed
from aicoss_cli.base.console import progress_display
from aicoss_cli.base.errors import TrainingStopped, UserError
from aicoss_cli.base.files import check_writable_folder, write_text_atomic
from aicoss_cli.base.runtime import make_runtime
from aicoss_cli.data.submission import write_scores_csv
from aicoss_cli.data.tables import read_test
from aicoss_cli.infer.forward import MemberSource, combine, forward, load_members, member_meta
from aicoss_cli.recipe import Recipe, recipe_to_toml
from aicoss_cli.results.cv import CvFolds, CvPlan, cv_json, fold_missing, load_cv, read_plan
from aicoss_cli.results.layout import CV_FILE, CV_RECIPE_FILE, CV_SUFFIX, OOF_FILE, STATE_FILE, SUBMISSION_FILE
from aicoss_cli.train.prepare import prepare_data
from aicoss_cli.train.run_dir import new_run_dir
from aicoss_cli.train.state import resolve_resume
from aicoss_cli.train.trainer import RunResult, Trainer

DISTILL_NO_FOLDS = ("[distill] with [data] folds: a distilled student is validated on its teachers' own single split "
                    "(fold models would validate on images the teachers trained on); unset [data] folds")


def fold_recipe(recipe: Recipe, fold: int | None) -> Recipe:
    """The recipe of fold k (`[data] fold = k`), or with fold None the plan's."""
    copy = recipe.model_copy(deep=True)
    copy.data.fold = fold
    return copy


def start_cv(recipe: Recipe, out: Path | str = "runs", console=None) -> CvPlan:
    """A new CV parent OUT/<name>/<timestamp>-cvK/ holding the plan (cv_recipe.toml), made only after
    the data is checked for every fold (CSVs, K against the rarest class, every image)."""
    if recipe.data.folds is None:
        raise ValueError("start_cv needs a recipe with [data] folds")
    if recipe.distill is not None:
        raise UserError(DISTILL_NO_FOLDS)
    check_writable_folder(out)
    with progress_display(console, enabled=console is not None, transient=True) as progress:
        prepare_data(fold_recipe(recipe, 0), progress)
    parent = new_run_dir(Path(out), recipe.name, suffix=f"{CV_SUFFIX}{recipe.data.folds}")
    write_text_atomic(parent / CV_RECIPE_FILE, recipe_to_toml(fold_recipe(recipe, None)))
    return read_plan(parent)


@dataclass
class CvSummary:
    """What `summarize` wrote into the CV parent, and the scores it holds."""

    cv: CvFolds
    oof_path: Path
    submission: Path
    cv_path: Path
    n_test: int
    seconds: float


@dataclass
class CvRun:
    """What `run_cv` did: the folds it trained, those already done, the summary once all K are."""

    plan: CvPlan
    trained: dict[int, RunResult] = field(default_factory=dict)
    done_before: list[int] = field(default_factory=list)
    summary: CvSummary | None = None
    missing: list[int] = field(default_factory=list)  # folds still to train (after --fold k)


def run_cv(plan: CvPlan, *, only: int | None = None, data: Path | None = None, console=None) -> CvRun:
    """Train every fold that is not done (or fold `only`), each a normal run in PARENT/fold{k}/; a fold
    with a saved state resumes from it. Under torchrun every process trains each fold in turn, in one
    process group. With all K done, rank 0 writes the summary (`summarize`)."""
    if only is not None and not 0 <= only < plan.folds:
        raise UserError(f"--fold {only}: a {plan.folds}-fold cross-validation has folds 0 to {plan.folds - 1}")
    recipe = plan.recipe
    if data is not None:
        recipe = recipe.model_copy(deep=True)
        recipe.data.root = str(data)
    run = CvRun(plan)
    info = distributed.setup(recipe.runtime.device != "cpu" and torch.cuda.is_available())
    try:
        for k in range(plan.folds) if only is None else [only]:
            folder = plan.fold_dir(k)
            if fold_missing(folder) is None:
                run.done_before.append(k)
                continue
            _say(console, info, f"[bold]fold {k}[/] ({k + 1} of {plan.folds}) in {plan.parent}")
            resume = resolve_resume(folder, data=data) if (folder / STATE_FILE).is_file() else None
            if resume is not None and resume.complete:
                run.done_before.append(k)
                continue
            try:
                run.trained[k] = Trainer(fold_recipe(recipe, k), plan.parent, resume=resume, console=console,
                                         run_dir=folder).run()
            except TrainingStopped as exc:
                raise TrainingStopped(f"{exc}; or continue the whole cross-validation with `aicoss train --resume "
                                      f"{plan.parent}`", exc.exit_code, diverged=exc.diverged) from None
    finally:
        distributed.teardown(info)
    run.missing = [k for k in range(plan.folds) if fold_missing(plan.fold_dir(k)) is not None]
    if info.main and not run.missing:
        if not run.trained and all((plan.parent / f).is_file() for f in (OOF_FILE, SUBMISSION_FILE, CV_FILE)):
            run.summary = written_summary(plan.parent, data)  # nothing new: no test pass again
        else:
            with progress_display(console, enabled=console is not None, transient=True) as progress:
                run.summary = summarize(plan.parent, data=data, progress=progress)
    return run


def written_summary(parent: Path, data: Path | None = None) -> CvSummary:
    """The summary a finished CV folder holds (its scores read back from the folds' files)."""
    parent = Path(parent)
    try:
        written = json.loads((parent / CV_FILE).read_text(encoding="utf-8"))
        n_test, seconds = int(written["n_test"]), float(written["summary_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{parent / CV_FILE}: unreadable; rewrite it with `aicoss cv summarize {parent}`") from None
    return CvSummary(load_cv(parent, data), parent / OOF_FILE, parent / SUBMISSION_FILE, parent / CV_FILE, n_test,
                     seconds)


def summarize(parent: Path | str, *, data: Path | None = None, device: str | None = None, batch_size: int | None = None,
              num_workers: int | None = None, progress=None) -> CvSummary:
    """Write the parent's oof.csv, submission.csv and cv.json from its K finished folds (all checked
    first: a fold not finished is an error naming it). Device, batch size and loader workers default
    to the plan's `[runtime]` (device, eval_batch_size or 64, num_workers)."""
    t0 = time.perf_counter()
    cv = load_cv(parent, data)
    r = cv.plan.recipe.runtime
    test = read_test(cv.root, cv.classes)
    for path in cv.checkpoints:
        member_meta(path).check_classes(cv.classes, str(path), cv.root / "train.csv")
    rt = make_runtime(device or r.device, "fp32", r.num_workers if num_workers is None else num_workers)
    members = load_members([MemberSource(p) for p in cv.checkpoints], rt, progress=progress)
    probs = forward(members, test.paths, rt, batch_size or r.eval_batch_size or 64, progress=progress,
                    what=f"test: {len(test)} images × {cv.folds} folds")
    parent = cv.plan.parent
    write_scores_csv(parent / OOF_FILE, cv.ids, cv.classes, cv.oof)
    # equal weights exactly as `aicoss ensemble` of the K checkpoints combines them
    write_scores_csv(parent / SUBMISSION_FILE, test.ids, test.classes, combine(probs, np.full(cv.folds, 1.0 / cv.folds)))
    seconds = time.perf_counter() - t0
    write_text_atomic(parent / CV_FILE, json.dumps(cv_json(cv, parent / SUBMISSION_FILE, len(test), seconds),
                                                   indent=2) + "\n")
    return CvSummary(cv, parent / OOF_FILE, parent / SUBMISSION_FILE, parent / CV_FILE, len(test), seconds)


def _say(console, info, text: str) -> None:
    if console is not None and info.main:
        console.print(text, highlight=False)
