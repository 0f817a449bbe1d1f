"""The training-side commands: train, validate, recipes, demo-data, split.

Plain functions with annotated parameters, registered on the app by `cli.py`; nothing heavy is
imported at module level (torch is imported by the jobs), so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.console import err, out, progress_display
from aicoss_cli.errors import UserError


def bundled_recipes() -> Path:
    """The recipes that ship with aicoss: aicoss_cli/recipes/ in an installed wheel, the top-level
    recipes/ in a source checkout (pyproject.toml maps the one into the other)."""
    here = Path(__file__).resolve().parent
    return next((f for f in (here / "recipes", here.parent / "recipes") if f.is_dir()), here / "recipes")


def find_recipe(recipe: Path) -> Path:
    """`recipe` itself when it exists; else a bare name (`tresnet_xl_pasl` or `tresnet_xl_pasl.toml`)
    is looked up among the bundled recipes. A path that exists nowhere is returned as given (the
    recipe loader then says it is not found)."""
    if recipe.exists() or recipe.name != str(recipe):
        return recipe
    bundled = bundled_recipes() / (recipe.name if recipe.suffix == ".toml" else f"{recipe.name}.toml")
    return bundled if bundled.is_file() else recipe


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file, or the name of a bundled one (`aicoss recipes`); optional with --resume: the run's own.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (overrides \\[data] root).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder that receives <name>/<timestamp>/ (default runs/). With --resume: continue in a new run folder there, leaving the original as it was.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value (repeatable).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder where it stopped.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even if the recipe changed (says what changed).")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes (GPUs) on this machine; launches torchrun.")] = 1,
) -> None:
    """Validate RECIPE, train it, evaluate val mAP every epoch, keep best/last checkpoints and write
    the best checkpoint's test submission.

    Example: [bold]aicoss train recipes/demo.toml --data data/demo --set optim.epochs=3[/]
    """
    from aicoss_cli.recipe import load_recipe, resolve_recipe

    if recipe is None and resume is None:
        raise UserError("train needs a RECIPE (or --resume RUN_DIR); see `aicoss recipes` for the bundled ones")
    recipe = find_recipe(recipe) if recipe is not None else None
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if resume is None:
            resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)  # fail here, not in N processes
        _launch_torchrun(nproc)
        return

    from aicoss_cli.engine import train as run_training

    resumed = None
    if resume is not None:
        from aicoss_cli.train_state import resolve_resume

        resumed = resolve_resume(resume, recipe, overrides, data=data, out=out_dir, force=force)
        if resumed.complete:
            if _is_main_process():
                out.print(f"{escape(str(resume))}: this run is already complete ({resumed.recipe.optim.epochs} "
                          "epochs and its submission); nothing to do (resume with --set optim.epochs=N --force "
                          "to train on)", highlight=False)
            return
        loaded = resumed.recipe
    else:
        loaded = resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)
    result = run_training(loaded, out_dir or Path("runs"), resume=resumed, console=err)
    if not _is_main_process():
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
    out.print(table)
    for note in result.notes:
        out.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    out.print(f"best val mAP [bold]{result.best_map:.4f}[/] at epoch {result.best_epoch}; "
              f"submission: {result.run_dir / 'submission.csv'}", highlight=False)


# --------------------------------------------------------------------------- recipes


def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file, or the name of a bundled one (`aicoss recipes`).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Also check this data root (CSVs, labels, images).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the resolved recipe (and the data counts) as JSON only.")] = False,
) -> None:
    """Check a recipe (keys, types, ranges, arch and loss names) and, with --data, the data it would train on.

    Example: [bold]aicoss validate recipes/tresnet_xl_pasl.toml --data data/demo[/]
    """
    from aicoss_cli.recipe import load_recipe, recipe_to_toml, resolve_recipe

    recipe = find_recipe(recipe)
    resolved = resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)
    prepared = None
    if data is not None:
        from aicoss_cli.data import prepare_data

        with progress_display(err, enabled=not as_json, transient=True) as progress:
            prepared = prepare_data(resolved, progress)
    if as_json:
        counts = None if prepared is None else {
            "labelled": len(prepared.table), "train": len(prepared.train_rows), "val": len(prepared.val_rows),
            "test": len(prepared.test), "classes": prepared.table.classes, "split": prepared.split}
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
    folders = [folder] if folder else [Path("recipes"), bundled_recipes()]
    for f in folders:
        if f.is_dir() and any(f.glob("*.toml")):
            return sorted(f.glob("*.toml"))
    return []


def recipes(
    folder: Annotated[Optional[Path], typer.Argument(help="Folder of recipes (default: the bundled ones).")] = None,
) -> None:
    """List the recipes: one per model row of the seed's tables, plus small CPU demos.

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



def demo_data(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo set (a new or empty folder).")],
    n_train: Annotated[int, typer.Option("--n-train", min=10, help="Training images.")] = 3000,
    n_test: Annotated[int, typer.Option("--n-test", min=1, help="Test images.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=16, help="Image side in pixels: an even number.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same files.")] = 0,
    unannotated: Annotated[float, typer.Option("--unannotated", help="Fraction of train labels marked -1 (not annotated), 0 ≤ x < 1.")] = 0.0,
) -> None:
    """Build the embedded demo data set: 2×2 mosaics of real handwritten digit scans
    (scikit-learn's `load_digits`), 10 classes, in the DACON layout, with test_labels.csv for scoring.

    Example: [bold]aicoss demo-data data/demo[/]
    """
    from aicoss_cli.demo import STAMP, build_demo_data

    existed = (folder / STAMP).is_file()  # reused below only if built with these very settings
    with progress_display(err, transient=True) as progress:
        task = progress.add_task("writing demo images", total=n_train + n_test)
        path = build_demo_data(folder, n_train=n_train, n_test=n_test, size=size, seed=seed, unannotated=unannotated,
                               on_progress=lambda n: progress.advance(task, n))
    what = (f"demo data in {escape(str(path))} reused (built before with these settings; nothing written)" if existed
            else f"demo data written to {escape(str(path))}")
    out.print(f"{what}: {n_train} train + {n_test} test images of {size}×{size}, 10 classes "
              f"(train.csv, test.csv, sample_submission.csv, test_labels.csv)", highlight=False)


def split(
    data: Annotated[Path, typer.Argument(help="Data root with train.csv.")],
    search: Annotated[int, typer.Option("--search", min=1, help="Random states to try (0..N-1).")] = 100,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Validation fraction, 0 < x < 1.")] = 0.1,
    kind: Annotated[Literal["random", "stratified"], typer.Option("--kind", help="The split to search: the seed's random one, or multi-label stratified.")] = "random",
    top: Annotated[int, typer.Option("--top", min=1, help="Rows to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ranked rows as JSON only.")] = False,
) -> None:
    """Repeat the seed's split-seed search: for each random state, the gap between the train and
    val positive rate of every class (mean and std over classes), most balanced first.

    Example: [bold]aicoss split data/demo --search 200[/]
    """
    from aicoss_cli.data import read_train
    from aicoss_cli.splits import split_search

    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    table_data = read_train(data)
    rows = []
    with progress_display(err, enabled=not as_json, transient=True) as progress:
        task = progress.add_task("searching split seeds", total=search)
        for state in range(search):
            rows += split_search(table_data.labels, val_fraction, [state], kind)
            progress.advance(task)
    rows.sort(key=lambda r: (r["mean"], r["std"]))
    best = f"--set data.split={kind} --set data.val_fraction={val_fraction:g} --set data.split_seed={rows[0]['split_seed']}"
    if as_json:
        print(json.dumps({"kind": kind, "val_fraction": val_fraction, "states": search, "use": best,
                          "rows": [{"rank": i, **r} for i, r in enumerate(rows[:top], 1)]}, indent=2))
        return
    table = Table(title=f"class-ratio gap train vs val ({kind}, val {val_fraction:g}, {search} states)",
                  title_justify="left")
    for col in ("rank", "split_seed", "mean gap", "std gap"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows[:top], 1):
        table.add_row(str(i), str(r["split_seed"]), f"{r['mean']:.5f}", f"{r['std']:.5f}")
    out.print(table)
    # the whole split, so a recipe with another [data] split or val_fraction gets this one
    out.print(f"use it with {best}", highlight=False)
