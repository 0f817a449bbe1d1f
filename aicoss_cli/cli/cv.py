"""The cross-validation commands: `aicoss cv summarize PARENT`, and `aicoss train --folds K` (which
`cli.train.train` hands to `train_cv`): parse, call `train.cv`, print the table.

Nothing heavy is imported at module level (torch is imported by the jobs), so `aicoss --help` stays
instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, is_main_process, note, out, print_table
from aicoss_cli.base.errors import UserError
from aicoss_cli.cli.options import AsJson, NumWorkers

cv_app = typer.Typer(name="cv", no_args_is_help=True, rich_markup_mode="rich",
                     help="Cross-validation folders (train --folds K): summarize one.")


@cv_app.command("summarize")
def summarize(
    parent: Annotated[Path, typer.Argument(help="A cross-validation folder, runs/<name>/<timestamp>-cvK.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: \\[data] root of its recipe).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N (default: the recipe's \\[runtime] device).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward pass (default: the recipe's \\[runtime] eval_batch_size, else 64).")] = None,
    num_workers: NumWorkers = None,
    as_json: AsJson = False,
) -> None:
    """Write a CV folder's oof.csv, cv.json and submission.csv.

    Once all K folds of a cross-validation folder are trained: oof.csv, every train image's
    probabilities from the fold model that did not train on it; submission.csv, the mean of the K
    fold checkpoints on the test set; cv.json, the scores. Prints the per-fold table.

    Example: [bold]aicoss cv summarize runs/starter/20240101T000000Z-cv5[/]
    """
    from aicoss_cli.base.console import progress_display
    from aicoss_cli.train.cv import summarize as write_summary

    with progress_display(err, enabled=not as_json, transient=True) as progress:
        summary = write_summary(parent, data=data, device=device, batch_size=batch_size, num_workers=num_workers,
                                progress=progress)
    if as_json:
        print(json.dumps(json.loads(summary.cv_path.read_text(encoding="utf-8")), indent=2))
        return
    print_summary(summary)


def train_cv(recipe, resume: Path | None, *, folds: int | None, fold: int | None, data: Path | None,
             out_dir: Path | None, launch) -> None:
    """`aicoss train` with folds: a new cross-validation of `recipe` (resolved, `[data] folds` set), or
    `resume` (a CV parent) continued; `--fold k` trains that fold only. With `launch` (--nproc N, no
    torchrun yet) the parent is made here and `launch(args)` re-runs `train --resume PARENT` under
    torchrun, so every process trains each fold in turn in the same folder."""
    from aicoss_cli.results.cv import read_plan
    from aicoss_cli.train.cv import run_cv, start_cv

    if resume is not None:
        plan = read_plan(resume)
        if folds is not None and folds != plan.folds:
            raise UserError(f"--folds {folds}: {resume} is a {plan.folds}-fold cross-validation; resume it "
                            "without --folds")
        only = fold
    else:
        only = fold if fold is not None else recipe.data.fold
        plan = None
    k_total = plan.folds if plan is not None else recipe.data.folds
    if only is not None and not 0 <= only < k_total:
        raise UserError(f"--fold {only}: a {k_total}-fold cross-validation has folds 0 to {k_total - 1}")
    if plan is None:
        from aicoss_cli.train.cv import fold_recipe

        plan = start_cv(fold_recipe(recipe, None), out_dir or Path("runs"), console=err)
        out.print(f"cross-validation folder: {escape(str(plan.parent))}", highlight=False)
    if launch is not None:
        launch(["train", "--resume", str(plan.parent), *(["--fold", str(only)] if only is not None else []),
                *(["--data", str(data)] if data is not None else [])])
        return
    run = run_cv(plan, only=only, data=data, console=err)
    if not is_main_process():
        return
    for k in run.done_before:
        note(f"fold {k} was already trained ({plan.fold_dir(k)})")
    if run.summary is not None:
        print_summary(run.summary)
    else:
        done = [k for k in range(plan.folds) if k not in run.missing]
        out.print(f"folds done: {', '.join(map(str, done)) or 'none'} of {plan.folds}; the summary (oof.csv, cv.json, "
                  f"submission.csv) is written when all are: train the others with `aicoss train --resume "
                  f"{escape(str(plan.parent))}` (or `--fold k` each), then `aicoss cv summarize` if needed",
                  highlight=False)


def print_summary(summary) -> None:
    """The per-fold table, then where the summary's files are."""
    cv = summary.cv
    print_folds(cv)
    out.print(f"oof: {escape(str(summary.oof_path))}; submission: {escape(str(summary.submission))} (mean of the "
              f"{cv.folds} fold checkpoints on {summary.n_test} test images); summary: {escape(str(summary.cv_path))}",
              highlight=False)


def print_folds(cv) -> None:
    """The per-fold table of a finished cross-validation (`results.cv.CvFolds`): each fold's val mAP
    and rows, the mean ± std of the folds, the out-of-fold mAP over every row."""
    from aicoss_cli.results.cv import mean_std
    from aicoss_cli.results.layout import OOF_FILE

    maps = cv.fold_maps
    mean, std = mean_std(maps)
    table = Table(title=f"{cv.folds}-fold cross-validation: {cv.plan.parent}", title_justify="left")
    for col in ("fold", "val images", "val mAP", "checkpoint"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for k, value in enumerate(maps):
        table.add_row(str(k), str(int((cv.fold_of == k).sum())), _num(value),
                      escape(str(cv.checkpoints[k].relative_to(cv.plan.parent))))
    table.add_row("mean ± std", "", f"{_num(mean)} ± {_num(std)}", "", style="bold")
    table.add_row("out-of-fold", str(len(cv.ids)), _num(cv.oof_map), OOF_FILE, style="bold green")
    print_table(table)


def _num(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"
