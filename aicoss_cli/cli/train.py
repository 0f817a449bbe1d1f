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
) -> None:
    """Train a recipe: val mAP per epoch, best/last checkpoints, submission.

    Validate RECIPE, train it, evaluate val mAP every epoch, keep best/last checkpoints and write
    the best checkpoint's test submission.

    Example: [bold]aicoss train recipes/demo.toml --data data/demo --set optim.epochs=3[/]
    """
    from aicoss_cli.recipe import find_recipe, load_recipe, resolve_recipe

    if recipe is None and resume is None:
        raise UserError("train needs a RECIPE (or --resume RUN_DIR); see `aicoss recipes` for the bundled ones")
    recipe = find_recipe(recipe) if recipe is not None else None
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if resume is None:
            resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)  # fail here, not in N processes
        _launch_torchrun(nproc)
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
    else:
        loaded = resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)
    result = run_training(loaded, out_dir or Path("runs"), resume=resumed, console=err)
    if not is_main_process():
        return
    _print_epochs(result)


def _launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torch.distributed.run with --nproc removed."""
    import subprocess

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


def _print_epochs(result) -> None:
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


