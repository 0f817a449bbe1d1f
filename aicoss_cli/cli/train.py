"""The training-side commands: train, validate, recipes.

Plain functions with annotated parameters, registered on the app by `cli.app`; nothing heavy is
imported at module level (torch is imported by the jobs), so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, is_main_process, note, out, print_table, progress_display
from aicoss_cli.base.errors import UserError


def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file, or the name of a bundled one (`aicoss recipes`); optional with --resume: the run's own.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (overrides \\[data] root).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder that receives <name>/<timestamp>/ (default runs/). With --resume: continue in a new run folder there, leaving the original as it was.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder where it stopped.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the recipe changed (says what changed).")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (GPUs) on this machine; launches torchrun.")] = 1,
    folds: Annotated[Optional[int], typer.Option("--folds", help="K-fold cross-validation (sets \\[data] folds): K runs in runs/<name>/<timestamp>-cvK/fold0..; then oof.csv, cv.json and the K checkpoints' mean submission.", show_default=False)] = None,
    fold: Annotated[Optional[int], typer.Option("--fold", help="Train this fold only (0-based), in a new cross-validation folder or in the one given to --resume.", show_default=False)] = None,
) -> None:
    """Train a recipe: val mAP per epoch, best/last checkpoints, submission.

    Validate RECIPE, train it, evaluate val mAP every epoch, keep best/last checkpoints and write
    the best checkpoint's test submission; with --folds K, one such run per fold (cross-validation).

    Example: [bold]aicoss train recipes/demo.toml --data data/demo --set optim.epochs=3[/]
    """
    from aicoss_cli.recipe import find_recipe, load_recipe, resolve_recipe
    from aicoss_cli.results.layout import is_cv_dir

    if recipe is None and resume is None:
        raise UserError("train needs a RECIPE (or --resume RUN_DIR); see `aicoss recipes` for the bundled ones")
    if folds is not None and folds < 2:
        raise UserError(f"--folds {folds}: K-fold cross-validation needs at least 2 folds")
    if fold is not None and fold < 0:
        raise UserError(f"--fold {fold}: folds are numbered from 0")
    recipe = find_recipe(recipe) if recipe is not None else None
    launcher = nproc > 1 and "WORLD_SIZE" not in os.environ
    cv_parent = resume is not None and is_cv_dir(resume)
    if resume is not None and not cv_parent and (folds is not None or fold is not None):
        raise UserError(f"--{'folds' if folds is not None else 'fold'}: {resume} is not a cross-validation folder "
                        "(runs/<name>/<timestamp>-cvK, made by `aicoss train --folds K`); resume it without "
                        "--folds and --fold")
    if cv_parent and (recipe is not None or overrides or out_dir is not None or force):
        raise UserError(f"{resume}: a cross-validation resumes as it was started; drop the RECIPE, --set, --out and "
                        "--force (a fold can be resumed on its own: --resume PARENT/fold2 with them)")
    loaded = None
    if resume is None:
        cv_set = [f"data.folds={folds}"] if folds is not None else []
        loaded = resolve_recipe(load_recipe(recipe, [*(overrides or []), *cv_set]), data_root=data)
        if fold is not None and loaded.data.folds is None:
            raise UserError(f"--fold {fold} needs --folds K (or [data] folds = K in the recipe)")
    if cv_parent or (loaded is not None and loaded.data.folds is not None):
        from aicoss_cli.cli.cv import train_cv

        train_cv(loaded, resume if cv_parent else None, folds=folds, fold=fold, data=data, out_dir=out_dir,
                 launch=(lambda args: launch_torchrun(nproc, args)) if launcher else None)
        return
    if launcher:
        launch_torchrun(nproc)
        return

    from aicoss_cli.train.trainer import train as run_training

    resumed = None
    if resume is not None:
        from aicoss_cli.train.state import resolve_resume

        resumed = resolve_resume(resume, recipe, overrides, data=data, out=out_dir, force=force)
        if resumed.complete:
            if is_main_process():
                out.print(f"{escape(str(resume))}: this run is already complete ({resumed.recipe.optim.epochs} "
                          "epochs and its submission); nothing to do (resume with --set optim.epochs=N --force "
                          "to train on)", highlight=False)
            return
        loaded = resumed.recipe
    result = run_training(loaded, out_dir or Path("runs"), resume=resumed, console=err)
    if not is_main_process():
        return
    print_epochs(result)


def launch_torchrun(nproc: int, args: list[str] | None = None) -> None:
    """Re-run this very command with --nproc removed (or `aicoss ARGS`) under torch.distributed.run."""
    import subprocess

    if args is None:
        args, skip = [], False
        for a in sys.argv[1:]:
            if skip:
                skip = False
                continue
            if a == "--nproc":
                skip = True
                continue
            if a.startswith("--nproc="):
                continue
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "aicoss_cli", *args]
    err.print(f"launching: {' '.join(cmd[1:])}", highlight=False)
    raise SystemExit(subprocess.call(cmd))


def print_epochs(result) -> None:
    table = Table(title=f"{result.run_dir}", title_justify="left")
    for col in ("epoch", "lr", "train loss", "val loss", "val mAP", "seconds"):
        table.add_column(col, justify="right")
    for row in result.rows:
        style = "bold green" if row["epoch"] == result.best_epoch else None
        table.add_row(str(row["epoch"]), f"{row['lr']:.3g}", f"{row['train_loss']:.4f}", f"{row['val_loss']:.4f}",
                      f"{row['val_map']:.4f}", f"{row['seconds']:.1f}", style=style)
    print_table(table)
    for text in result.notes:
        note(text)
    out.print(f"best val mAP [bold]{result.best_map:.4f}[/] at epoch {result.best_epoch}; "
              f"submission: {result.run_dir / 'submission.csv'}", highlight=False)


# --------------------------------------------------------------------------- recipes


def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file, or the name of a bundled one (`aicoss recipes`).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Also check this data root (CSVs, labels, images).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the resolved recipe (and the data counts) as JSON only.")] = False,
) -> None:
    """Check a recipe and, with --data, the data it would train on.

    Check a recipe (keys, types, ranges, arch and loss names) and, with --data, the data it would train on.

    Example: [bold]aicoss validate recipes/tresnet_xl_pasl.toml --data data/demo[/]
    """
    from aicoss_cli.recipe import find_recipe, load_recipe, recipe_to_toml, resolve_recipe

    recipe = find_recipe(recipe)
    resolved = resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)
    prepared = None
    if data is not None:
        from aicoss_cli.train.prepare import prepare_data

        with progress_display(err, enabled=not as_json, transient=True) as progress:
            prepared = prepare_data(resolved, progress)
    same = []
    if prepared is not None:
        from aicoss_cli.data.duplicates import describe_same_images, same_images

        same = same_images(prepared.table.paths)
        if same:
            note(describe_same_images(prepared.table.ids, same, prepared.val_rows), err if as_json else out)
    if as_json:
        counts = None if prepared is None else {
            "labelled": len(prepared.table), "train": len(prepared.train_rows), "val": len(prepared.val_rows),
            "test": len(prepared.test), "classes": prepared.table.classes, "split": prepared.split,
            "same_images": [[prepared.table.ids[i], prepared.table.ids[j]] for i, j in same]}
        print(json.dumps({"recipe": str(recipe), "valid": True, "resolved": resolved.model_dump(), "data": counts},
                         indent=2, ensure_ascii=False))
        return
    if prepared is not None:
        out.print(f"data: {len(prepared.table)} labelled images ({len(prepared.train_rows)} train, "
                  f"{len(prepared.val_rows)} val), {len(prepared.test)} test images, "
                  f"{len(prepared.table.classes)} classes", highlight=False)
    out.print(f"[green]ok:[/] {recipe} is valid; resolved recipe:", highlight=False)
    out.print(recipe_to_toml(resolved), highlight=False, markup=False)


def _recipe_files(folder: Path | None) -> list[Path]:
    from aicoss_cli.recipe import bundled_recipes

    folders = [folder] if folder else [Path("recipes"), bundled_recipes()]
    for f in folders:
        if f.is_dir() and any(f.glob("*.toml")):
            return sorted(f.glob("*.toml"))
    return []


def recipes(
    folder: Annotated[Optional[Path], typer.Argument(help="Folder of recipes (default: the bundled ones).")] = None,
) -> None:
    """List the recipes: one per row of the seed's tables, plus CPU demos.

    List the recipes: one per model row of the seed's tables, plus small CPU demos.

    Example: [bold]aicoss recipes[/]
    """
    from aicoss_cli.recipe import load_recipe

    files = _recipe_files(folder)
    if not files:
        raise UserError(f"{folder or 'recipes/'}: no recipe files (*.toml) found")
    table = Table(title=f"recipes in {files[0].parent}", title_justify="left")
    for col in ("recipe", "arch", "loss", "prior", "lr", "min_lr", "augment", "batch", "epochs"):
        table.add_column(col, no_wrap=col in ("recipe", "arch"))
    for f in files:
        r = load_recipe(f, check_names=False)
        prior = "-" if r.loss.prior is False else str(r.loss.prior)
        accum = f"/{r.optim.grad_accumulation}" if r.optim.grad_accumulation > 1 else ""
        table.add_row(escape(f.stem), r.model.arch, r.loss.name, escape(prior), f"{r.optim.lr:g}", f"{r.optim.min_lr:g}",
                      r.augment.policy, f"{r.optim.batch_size}{accum}", str(r.optim.epochs))
    out.print(table)


