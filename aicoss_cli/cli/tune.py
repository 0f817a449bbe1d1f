"""The `tune` command: parse, check the recipe, the data and the search space, run the study
(`aicoss_cli.tune`), print the trials.

A plain function with annotated parameters, registered on the app by `cli.app`. Optuna, torch and
matplotlib are imported inside the command, so `aicoss --help` stays instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, note, out, print_table
from aicoss_cli.base.errors import UserError


def tune(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file to start from, or the name of a bundled one (e.g. starter).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (overrides \\[data] root).")] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Finished (complete or pruned) trials the study should hold; a resumed study runs only the missing ones.")] = 20,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs of every trial (default: the recipe's); short runs, the best recipe keeps the recipe's own.")] = None,
    space: Annotated[Optional[Path], typer.Option("--space", help="Search space TOML (default: lr, weight decay, augmentation, warm-up, and the loss where train.csv has -1 labels).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=0, help="Start no trial after this many seconds (the running one finishes).")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna storage URL (default sqlite:///<--out>/tune.db); an RDB URL (postgresql://, mysql://) for machines sharing one study.")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name (default <recipe name>-<data folder>); the same name continues the study.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Trials go to <out>/<study>/ as run folders, with trials.csv, best.toml and trials.png.")] = Path("runs/tune"),
) -> None:
    """Search a recipe's hyper-parameters with Optuna (a resumable study).

    Search a recipe's hyper-parameters with Optuna: every trial a short `aicoss train` run, a
    median pruner, a resumable study; prints the trials and writes the best recipe.

    Example: [bold]aicoss tune recipes/starter.toml --data data/demo --trials 12 --epochs 3[/]
    """
    from aicoss_cli.tune.space import TrialRecipes, load_space
    from aicoss_cli.tune.study import import_optuna
    from aicoss_cli.tune.study import tune as run_tune

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("aicoss tune runs each trial in one process, not under torchrun; on several GPUs start one "
                        "tune per GPU (CUDA_VISIBLE_DEVICES=N) with the same --storage and --study")
    import_optuna()
    recipes = TrialRecipes(recipe, data=data, epochs=epochs)
    from rich.progress import Progress

    with Progress(console=err, transient=True) as progress:
        recipes.inspect_data(progress)
    search = load_space(space, recipes)
    _print_space(search, recipes.epochs)
    result = run_tune(recipes, search, trials=trials, out=out_dir, storage=storage, study_name=study, timeout=timeout,
                      console=err, say=lambda text: err.print(text, highlight=False))
    _print_trials(result, search)
    for text in result.notes:
        note(text)
    _print_files(result)


def _print_space(space, epochs: int) -> None:
    table = Table(title=f"search space: {space.source}", title_justify="left")
    for col in ("key", "values", "only when"):
        table.add_column(col)
    for p in space.params:
        table.add_row(escape(p.key), escape(p.describe()), escape(p.describe_when()))
    out.print(table)
    s = space.settings
    if s.pruner == "none":
        pruner = "no pruner"
    elif space.min_epochs >= epochs:
        pruner = (f"median pruner from epoch {space.min_epochs}: these {epochs}-epoch trials are never pruned (the "
                  "last epoch is not; set [tune] min_epochs or a longer --epochs)")
    else:
        pruner = f"median pruner after {s.startup_trials} completed trials, from epoch {space.min_epochs}"
    out.print(escape(f"sampler {s.sampler}{'' if s.seed is None else f' (seed {s.seed})'}; {pruner}"), highlight=False)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _headers(keys: list[str]) -> list[str]:
    """`lr` for `optim.lr` where the short name is unique in the space."""
    short = [k.split(".", 1)[-1] for k in keys]
    return [s if short.count(s) == 1 else k for s, k in zip(short, keys)]


def _print_trials(result, space) -> None:
    keys = [p.key for p in space.params]
    table = Table(title=f"study {result.study} ({result.storage}), run folders under {result.study_dir}",
                  title_justify="left")
    for col in ("trial", "state", "val mAP", "epochs", *_headers(keys), "seconds", "run folder"):
        table.add_column(escape(col), justify="right" if col in ("trial", "val mAP", "epochs", "seconds") else "left",
                         overflow="fold" if col == "run folder" else "ellipsis")
    colours = {"complete": "green", "pruned": "yellow", "diverged": "yellow", "failed": "red", "interrupted": "red",
               "killed": "red"}
    for r in result.rows:
        best = result.best is not None and r.number == result.best.number
        state = f"[{colours[r.state]}]{r.state}[/]" if r.state in colours else r.state
        table.add_row(f"{r.number}{' (recipe)' if r.baseline else ''}", state,
                      "-" if r.value is None else f"{r.value:.4f}", str(len(r.curve)),
                      *(escape(_fmt(r.params[k])) if k in r.params else "-" for k in keys),
                      "-" if r.seconds is None else f"{r.seconds:.0f}", escape(_relative(r.run_dir, result.study_dir)),
                      style="bold" if best else None)
    print_table(table)
    states = [r.state for r in result.rows]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    out.print(f"{len(states)} trials ({counts}); {result.ran} run now", highlight=False)


def _relative(run_dir: str, study_dir: Path) -> str:
    if not run_dir:
        return "-"
    try:
        return str(Path(run_dir).relative_to(study_dir))
    except ValueError:
        return run_dir


def _print_files(result) -> None:
    if result.best is not None:
        b = result.best
        out.print(f"best: trial {b.number}, val mAP [bold]{b.value:.4f}[/]; recipe: "
                  f"{escape(str(result.files['best']))}", highlight=False)
        out.print(f"train it: aicoss train {escape(str(result.files['best']))}", highlight=False, markup=False)
    else:
        out.print("no trial has completed yet: no best recipe", highlight=False)
    for key in ("trials", "picture"):
        if key in result.files:
            out.print(f"{key}: {escape(str(result.files[key]))}", highlight=False)
