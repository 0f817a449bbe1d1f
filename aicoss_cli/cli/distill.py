"""The `distill` command: parse, train the recipe with a [distill] table through the one Trainer,
print the epochs and the student beside its teachers.

A plain function with annotated parameters, registered on the app by `cli.app`; torch is imported
by the job, so `aicoss --help` stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, is_main_process, out
from aicoss_cli.base.errors import UserError


def distill(
    recipe: Annotated[Path, typer.Argument(help="The student's recipe TOML file, or the name of a bundled one (`aicoss recipes`).")],
    teachers: Annotated[Optional[list[Path]], typer.Option("--teacher", help="A teacher: a checkpoint, a run folder (its kept checkpoint) or an ENSEMBLE.toml (its members, weights and TTA); repeatable. The teacher is their weighted mean, as `aicoss ensemble` computes it. Default: the recipe's \\[distill] teachers.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (overrides \\[data] root); the student's val split must be the teachers' own.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder that receives <name>/<timestamp>/ (default runs/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable), e.g. distill.weight=0.5.")] = None,
    weight: Annotated[Optional[float], typer.Option("--weight", min=0.0, max=1.0, help="Weight of the teacher term (BCE against the teacher's probabilities); 1 - weight goes to the recipe's loss on the labels. Default: the recipe's, else 0.9.", show_default=False)] = None,
    mode: Annotated[Optional[Literal["online", "cached"]], typer.Option("--mode", help="online: the teachers see every augmented batch; cached: their outputs on the clean images, computed once and stored in the run folder. Default: the recipe's, else online.", show_default=False)] = None,
    unlabeled: Annotated[Optional[list[str]], typer.Option("--unlabeled", help="Images without labels that get the teacher term only: test (test.csv) or a CSV of img_id,img_path; repeatable.", show_default=False)] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (GPUs) on this machine; launches torchrun.")] = 1,
) -> None:
    """Distil an ensemble of teachers into one model trained by RECIPE.

    The loss: weight × BCE against the teacher's probabilities + (1 − weight) × the recipe's loss on the labels.
    The teacher is the weighted mean of the members' probabilities, as `aicoss ensemble` computes it.
    Online (default), the teachers see every augmented batch the student sees; cached, their outputs on the clean images.
    Resume with `aicoss train --resume RUN_DIR`: the run's recipe.toml holds the teachers.

    Example: [bold]aicoss distill recipes/starter.toml --teacher runs/starter/A --teacher runs/starter/B --data data/own[/]
    """
    from aicoss_cli.cli.train import launch_torchrun, print_epochs
    from aicoss_cli.recipe import find_recipe, load_recipe, resolve_recipe
    from aicoss_cli.train.distill import distill_overrides

    path = find_recipe(recipe)
    loaded = load_recipe(path, [*(overrides or []), *distill_overrides(teachers or [], weight, mode, unlabeled)])
    if loaded.distill is None:
        raise UserError(f"{path}: no teacher; give --teacher PATH (a checkpoint, a run folder or an ENSEMBLE.toml), "
                        "or [distill] teachers in the recipe")
    if loaded.data.folds is not None:
        from aicoss_cli.train.cv import DISTILL_NO_FOLDS

        raise UserError(f"{path}: {DISTILL_NO_FOLDS}")
    resolved = resolve_recipe(loaded, data_root=data)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        launch_torchrun(nproc)
        return

    from aicoss_cli.train.trainer import train as run_training

    result = run_training(resolved, out_dir or Path("runs"), console=err)
    if not is_main_process():
        return
    print_epochs(result)
    from aicoss_cli.results.distillation import load_distill_record
    from aicoss_cli.results.layout import DISTILL_FILE
    from aicoss_cli.results.runs import load_run

    print_teachers(load_run(result.run_dir), load_distill_record(result.run_dir / DISTILL_FILE))


def print_teachers(run, record) -> None:
    """A distilled run (`results.runs.Run`) beside its teachers (`results.distillation.DistillRecord`):
    val mAP and img/s of each member, of the teacher (their weighted mean) and of the student, and
    the share of the teacher's gain over its best member that the student recovers."""
    from aicoss_cli.results.distillation import gain_recovered

    table = Table(title=f"student and teachers on the val split ({record.n_val} images; img/s: the one forward "
                        f"loop, {record.device}, {record.precision})", title_justify="left")
    for col in ("model", "arch", "size", "weight", "val mAP", "img/s"):
        table.add_column(col, justify="left" if col in ("model", "arch") else "right")
    for m in record.members:
        table.add_row(escape(m.path), escape(m.arch), str(m.img_size), f"{m.weight:.3f}", _num(m.val_map),
                      f"{m.img_per_s:.1f}")
    n = len(record.members)
    table.add_row(f"teacher: weighted mean of {n} member{'s' * (n != 1)}", "", "", "", _num(record.val_map),
                  f"{record.img_per_s:.1f}", style="bold")
    table.add_row(f"student ({record.mode}, weight {record.weight:g}"
                  f"{f', {record.n_unlabeled} unlabeled images' if record.n_unlabeled else ''})",
                  escape(run.arch), str(run.img_size), "", _num(run.best_val_map),
                  "-" if run.eval_img_per_s is None else f"{run.eval_img_per_s:.1f}", style="bold green")
    out.print(table)
    best = record.best_member
    share = gain_recovered(best.val_map if best else None, record.val_map, run.best_val_map)
    if share is not None:
        out.print(f"the student recovers {share:.0%} of the teacher's val mAP gain over its best member", highlight=False)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
