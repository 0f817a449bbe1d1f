"""The `aicoss` command line: parses arguments, loads recipes, calls the engine, prints tables.

No torch logic lives here, and nothing heavy is imported at module level: `aicoss --help`
answers without importing torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aicoss_cli.errors import TrainingStopped, UserError

app = typer.Typer(
    name="aicoss",
    help="Train, predict, ensemble and benchmark multi-label image classifiers "
    "(the 2023 AICOSS winning recipe as a tool).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _console(stderr: bool) -> Console:
    # A pipe or a log file gets wide tables instead of Rich's 80-column default (COLUMNS still wins).
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None)


out = _console(stderr=False)
err = _console(stderr=True)

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except UserError as exc:
        if _is_main_process():
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except TrainingStopped as exc:
        if _is_main_process():
            err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


# --------------------------------------------------------------------------- train


@app.command()
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe TOML file (optional with --resume: the run's own).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (overrides [data] root).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder that receives <name>/<timestamp>/.")] = Path("runs"),
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
    data_root = data
    if resume is not None:
        from aicoss_cli.engine import load_train_state  # validates the folder before anything else

        load_train_state(resume)
        stored = load_recipe(Path(resume) / "recipe.toml")
        if data_root is None:
            data_root = Path(stored.data.root)
    source = recipe if recipe is not None else Path(resume) / "recipe.toml"
    loaded = resolve_recipe(load_recipe(source, overrides or []), data_root=data_root)

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_torchrun(nproc)
        return

    from aicoss_cli.engine import train as run_training

    result = run_training(loaded, out_dir, resume=resume, force=force, console=err,
                          resume_recipe_given=recipe is not None or bool(overrides))
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


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Also check this data root (CSVs, labels, images).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: section.key=value.")] = None,
) -> None:
    """Check a recipe (keys, types, ranges, arch and loss names) and, with --data, the data it would train on.

    Example: [bold]aicoss validate recipes/tresnet_xl_pasl.toml --data data/demo[/]
    """
    from aicoss_cli.recipe import load_recipe, recipe_to_toml, resolve_recipe

    resolved = resolve_recipe(load_recipe(recipe, overrides or []), data_root=data)
    if data is not None:
        from rich.progress import Progress

        from aicoss_cli.engine import prepare_data

        with Progress(console=err, transient=True) as progress:
            prepared = prepare_data(resolved, progress)
        out.print(f"data: {len(prepared.table)} labelled images ({len(prepared.train_rows)} train, "
                  f"{len(prepared.val_rows)} val), {len(prepared.test)} test images, "
                  f"{len(prepared.table.classes)} classes", highlight=False)
    out.print(f"[green]ok:[/] {recipe} is valid; resolved recipe:", highlight=False)
    out.print(recipe_to_toml(resolved), highlight=False, markup=False)


def _recipe_files(folder: Path | None) -> list[Path]:
    folders = [folder] if folder else [Path("recipes"), RECIPES_DIR]
    for f in folders:
        if f.is_dir() and any(f.glob("*.toml")):
            return sorted(f.glob("*.toml"))
    return []


@app.command()
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


# --------------------------------------------------------------------------- models and weights


@app.command("count-params")
def count_params(
    archs: Annotated[Optional[list[str]], typer.Argument(help="Architectures (default: every registered one).")] = None,
    num_classes: Annotated[int, typer.Option("--classes", min=1, help="Number of classes.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable rows.")] = False,
) -> None:
    """Table Backbone / Decoder / Params (M) of every architecture, built on the meta device (no memory).

    Trainable parameters, as the seed counted them: a frozen query embedding does not count.

    Example: [bold]aicoss count-params tresnet_xl_mldecoder cvt_q2l[/]
    """
    import json

    from aicoss_cli.models import param_rows

    rows = param_rows(list(archs) if archs else None, num_classes)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"trainable parameters, {num_classes} classes", title_justify="left")
    for col, justify in (("arch", "left"), ("Backbone", "left"), ("Decoder", "left"), ("Params (M)", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(r["arch"], r["backbone"], r["decoder"], f"{r['params'] / 1e6:.2f}")
    out.print(table)


def _read_class_names(path: Path) -> list[str]:
    """Class names from a .txt (one per line) or a CSV header (columns after img_id/img_path)."""
    if not path.is_file():
        raise UserError(f"{path}: class list not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        header = [c.strip() for c in text.splitlines()[0].split(",")] if text.strip() else []
        names = [c for c in header if c not in ("img_id", "img_path")]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: no class names (a .txt with one per line, or a CSV header such as train.csv's)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{path}: class {dup!r} is listed twice")
    return names


@app.command("import-weights")
def import_weights(
    weights: Annotated[Path, typer.Argument(help="A seed .pt/.pth state dict (or .safetensors).")],
    arch: Annotated[str, typer.Option("--arch", help="The arch the weights were trained as (a seed --model_name).")],
    classes: Annotated[Path, typer.Option("--classes", help="Class names: a .txt (one per line) or a CSV with the header.")],
    out_file: Annotated[Path, typer.Option("--out", help="The checkpoint to write (.safetensors); never overwritten.")],
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=16, help="Input size (default: the arch's).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root the weights were trained on (records its val split).")] = None,
) -> None:
    """Turn a seed state dict into an aicoss checkpoint with metadata, for predict and ensemble.

    The file is read with torch.load(weights_only=True): nothing is unpickled. The split recorded is
    the seed's (random, 10 % val, random_state 78).

    Example: [bold]aicoss import-weights tresnet_xl_pasl.pt --arch tresnet_xl_mldecoder --classes data/aicoss/train.csv --out tresnet_xl_pasl.safetensors[/]
    """
    from aicoss_cli.checkpoint import CheckpointMeta, load_weights, save_checkpoint
    from aicoss_cli.models import ARCHS, build_model, default_img_size, load_state_dict_file
    from aicoss_cli.recipe import Recipe, recipe_to_toml

    if out_file.exists():
        raise UserError(f"{out_file}: already exists; choose another --out (nothing is overwritten)")
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(arch, list(ARCHS), n=3, cutoff=0.5)
        raise UserError(f"--arch: unknown architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    names = _read_class_names(classes)
    size = img_size or default_img_size(arch)
    state = load_state_dict_file(weights)
    model = build_model(arch, len(names), pretrained=False, img_size=size)
    load_weights(model, state, str(weights), f"arch {arch!r} with {len(names)} classes ({classes})")
    recipe = Recipe.model_validate({"name": out_file.stem.replace(" ", "_") or "imported",
                                    "description": f"imported from {weights.name}",
                                    "model": {"arch": arch, "img_size": size},
                                    "data": {"root": str(data) if data else "data/aicoss"}})
    split = {"kind": "random", "val_fraction": 0.1, "split_seed": 78}
    if data is not None:
        from aicoss_cli.data import read_train, split_fingerprint, split_indices

        table = read_train(data)
        if table.classes != names:
            raise UserError(f"{data}/train.csv: its classes differ from {classes}")
        _, val = split_indices(table.labels, "random", 0.1, 78)
        split.update(n_rows=len(table), n_val=int(len(val)), val_fingerprint=split_fingerprint(table.ids, val))
    meta = CheckpointMeta(arch=arch, img_size=size, classes=names, recipe_toml=recipe_to_toml(recipe), split=split,
                          extra={"imported_from": str(weights)})
    save_checkpoint(out_file, model.state_dict(), meta)
    out.print(f"wrote {out_file}: {arch}, {len(names)} classes, {len(state)} tensors, img_size {size}", highlight=False)


@app.command()
def prior(
    checkpoint: Annotated[Path, typer.Argument(help="A trained checkpoint (.safetensors).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the checkpoint's recipe's).")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write Classes,avg_pred; never overwritten.")] = Path("prior.csv"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Mean sigmoid prediction of a model over the training split: the class prior for P-ASL.

    Use the CSV with [loss] prior = "prior.csv" (partial_selective, partial_mode = "selective").

    Example: [bold]aicoss prior runs/demo/20260101T000000Z/best.safetensors --data data/demo --out prior.csv[/]
    """
    from rich.progress import Progress

    from aicoss_cli.checkpoint import model_from_checkpoint
    from aicoss_cli.data import check_images, read_train, split_fingerprint, split_indices
    from aicoss_cli.engine import select_device
    from aicoss_cli.prior import mean_prediction_prior, write_prior_csv
    from aicoss_cli.recipe import recipe_from_toml

    if out_file.exists():
        raise UserError(f"{out_file}: already exists; choose another --out (nothing is overwritten)")
    model, meta = model_from_checkpoint(checkpoint)
    recipe = recipe_from_toml(meta.recipe_toml, str(checkpoint)) if meta.recipe_toml else None
    root = data or (Path(recipe.data.root) if recipe else None)
    if root is None:
        raise UserError(f"{checkpoint}: no data root recorded; pass --data DIR")
    table = read_train(root)
    if table.classes != meta.classes:
        raise UserError(f"{root}/train.csv: its classes differ from the checkpoint's ({len(meta.classes)} classes)")
    split = meta.split or {"kind": "random", "val_fraction": 0.1, "split_seed": 78}
    train_rows, val_rows = split_indices(table.labels, split.get("kind", "random"), split.get("val_fraction", 0.1),
                                         split.get("split_seed", 78))
    if split.get("val_fingerprint") and split["val_fingerprint"] != split_fingerprint(table.ids, val_rows):
        raise UserError(f"{root}: its train/val split differs from the one {checkpoint} was trained with")
    paths = [table.paths[i] for i in train_rows]
    check_images(paths, Path(root) / "train.csv")
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("predicting the training split", total=len(paths))
        values = mean_prediction_prior(model, paths, meta.img_size, select_device(device), batch_size=batch_size,
                                       on_batch=lambda n: progress.advance(task, n))
    write_prior_csv(out_file, meta.classes, values.tolist())
    table_out = Table(title=f"class prior ({len(paths)} training images) → {out_file}", title_justify="left")
    table_out.add_column("class")
    table_out.add_column("avg_pred", justify="right")
    for name, value in zip(meta.classes, values.tolist()):
        table_out.add_row(escape(name), f"{value:.4f}")
    out.print(table_out)


# --------------------------------------------------------------------------- data


@app.command("demo-data")
def demo_data(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo set (a new or empty folder).")],
    n_train: Annotated[int, typer.Option("--n-train", min=10, help="Training images.")] = 3000,
    n_test: Annotated[int, typer.Option("--n-test", min=1, help="Test images.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=16, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same files.")] = 0,
    unannotated: Annotated[float, typer.Option("--unannotated", help="Fraction of train labels marked -1 (not annotated).")] = 0.0,
) -> None:
    """Build the embedded demo data set: 2×2 mosaics of real handwritten digit scans
    (scikit-learn's `load_digits`), 10 classes, in the DACON layout, with test_labels.csv for scoring.

    Example: [bold]aicoss demo-data data/demo[/]
    """
    from rich.progress import Progress

    from aicoss_cli.demo import build_demo_data

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("writing demo images", total=n_train + n_test)
        path = build_demo_data(folder, n_train=n_train, n_test=n_test, size=size, seed=seed, unannotated=unannotated,
                               on_progress=lambda n: progress.advance(task, n))
    out.print(f"demo data in {path}: {n_train} train + {n_test} test images of {size}×{size}, 10 classes "
              f"(train.csv, test.csv, sample_submission.csv, test_labels.csv)", highlight=False)


@app.command()
def split(
    data: Annotated[Path, typer.Argument(help="Data root with train.csv.")],
    search: Annotated[int, typer.Option("--search", min=1, help="Random states to try (0..N-1).")] = 100,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=1.0, help="Validation fraction.")] = 0.1,
    kind: Annotated[str, typer.Option("--kind", help="random | stratified")] = "random",
    top: Annotated[int, typer.Option("--top", min=1, help="Rows to show.")] = 10,
) -> None:
    """Repeat the seed's split-seed search: for each random state, the gap between the train and
    val positive rate of every class (mean and std over classes), most balanced first.

    Example: [bold]aicoss split data/demo --search 200[/]
    """
    from rich.progress import Progress

    from aicoss_cli.data import read_train, split_search

    if kind not in ("random", "stratified"):
        raise UserError(f"--kind must be random or stratified (got {kind!r})")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    table_data = read_train(data)
    rows = []
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("searching split seeds", total=search)
        for state in range(search):
            rows += split_search(table_data.labels, val_fraction, [state], kind)
            progress.advance(task)
    rows.sort(key=lambda r: (r["mean"], r["std"]))
    table = Table(title=f"class-ratio gap train vs val ({kind}, val {val_fraction:g}, {search} states)",
                  title_justify="left")
    for col in ("rank", "split_seed", "mean gap", "std gap"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rows[:top], 1):
        table.add_row(str(i), str(r["split_seed"]), f"{r['mean']:.5f}", f"{r['std']:.5f}")
    out.print(table)
    out.print(f"use it with --set data.split_seed={rows[0]['split_seed']}", highlight=False)
from aicoss_cli import cli_inference  # noqa: E402,F401  (registers predict, ensemble, benchmark-fp16)


def _one_line_summaries(typer_app: typer.Typer) -> None:
    """The command list shows each docstring's first paragraph as one flowing line (Typer would keep
    the docstring's line breaks there)."""
    import inspect

    for info in typer_app.registered_commands:
        if info.short_help is None and info.callback is not None and info.callback.__doc__:
            first = inspect.cleandoc(info.callback.__doc__).split("\n\n")[0]
            info.short_help = " ".join(first.split())


_one_line_summaries(app)
