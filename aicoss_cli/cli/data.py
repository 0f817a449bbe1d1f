"""The data commands: demo-data (the embedded demo set) and split (the seed's split-seed search).

Plain functions with annotated parameters, registered on the app by `cli.app`; the jobs are imported
inside them, so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, out, print_table, progress_display
from aicoss_cli.base.errors import UserError


def demo_data(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo set (a new or empty folder).")],
    n_train: Annotated[int, typer.Option("--n-train", min=10, help="Training images.")] = 3000,
    n_test: Annotated[int, typer.Option("--n-test", min=1, help="Test images.")] = 1000,
    size: Annotated[int, typer.Option("--size", min=16, help="Image side in pixels: an even number.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same files.")] = 0,
    unannotated: Annotated[float, typer.Option("--unannotated", help="Fraction of train labels marked -1 (not annotated), 0 ≤ x < 1.")] = 0.0,
) -> None:
    """Build the embedded demo data set: digit mosaics in the DACON layout.

    Build the embedded demo data set: 2×2 mosaics of real handwritten digit scans
    (scikit-learn's `load_digits`), 10 classes, in the DACON layout, with test_labels.csv for scoring.

    Example: [bold]aicoss demo-data data/demo[/]
    """
    from aicoss_cli.data.demo import STAMP, build_demo_data

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
    """Search split seeds for the train/val split with the most even classes.

    Repeat the seed's split-seed search: for each random state, the gap between the train and
    val positive rate of every class (mean and std over classes), most balanced first.

    Example: [bold]aicoss split data/demo --search 200[/]
    """
    from aicoss_cli.data.splits import split_search
    from aicoss_cli.data.tables import read_train

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
    print_table(table)
    # the whole split, so a recipe with another [data] split or val_fraction gets this one
    out.print(f"use it with {best}", highlight=False)
