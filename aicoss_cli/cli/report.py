"""The `report` command: parse, call `results.report.build_report`, print the tables.

A plain function with annotated parameters, registered on the app by `cli.app`. matplotlib and
the run readers are imported inside the command, so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import clock, err, note, out, print_table


def report(
    run_dirs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders runs/<recipe name>/<timestamp> (one still training is fine). Optional with --ensemble: then its members' runs.", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the pictures (default: the run's folder for one run, else ./report). A file there that aicoss report did not write is never replaced.")] = None,
    ensembles: Annotated[Optional[list[Path]], typer.Option("--ensemble", help="An `aicoss ensemble` result JSON (<out stem>.json beside its CSV); repeatable.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root for the per-class AP labels (default: \\[data] root of each run's recipe).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only (notes go to stderr).")] = False,
) -> None:
    """Summarise runs and ensembles: a table, curves, per-class AP pictures.

    Summarise runs and draw curves.png (losses and val mAP per epoch), per_class_ap.png (best
    checkpoint's val AP per class, weakest marked) and ensemble_tradeoff.png (val mAP against
    training time and inference speed).

    Example: [bold]aicoss report runs/demo/* --ensemble ensemble_submission.json --out report[/]
    """
    from aicoss_cli.results.report import build_report, report_json

    result = build_report(run_dirs or [], out=out_dir, ensembles=ensembles or [], data=data)
    if as_json:
        for text in result.notes:
            note(text, err)
        print(json.dumps(report_json(result), indent=2, allow_nan=False))
        return
    _print_runs(result)
    _print_class_ap(result)
    if result.ensembles:
        _print_ensembles(result)
    for text in result.notes:
        note(text)
    for path in result.pictures.values():
        out.print(f"picture: {escape(str(path))}", highlight=False)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _speed(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _print_runs(result) -> None:
    table = Table(title="runs")
    for col in ("run", "recipe", "arch", "loss", "epochs", "best val mAP", "best epoch", "train time",
                "train img/s", "eval img/s", "status"):
        table.add_column(col, justify="left" if col in ("run", "recipe", "arch", "loss", "status") else "right")
    for run in result.runs:
        table.add_row(escape(run.label), escape(run.name), escape(run.arch), escape(run.loss),
                      f"{run.epochs_done}/{run.epochs}", _num(run.best_val_map), str(run.best_epoch),
                      clock(run.train_seconds), _speed(run.train_img_per_s), _speed(run.eval_img_per_s),
                      escape(run.status))
    print_table(table)


def _print_class_ap(result) -> None:
    from aicoss_cli.results.pictures import ap_table

    pairs = [(run, a) for run, a in zip(result.runs, result.class_aps) if a is not None]
    if not pairs:
        return
    t = ap_table([a for _, a in pairs])
    many = len(pairs) > 1
    first = pairs[0][1]
    same_split = all(a.classes == first.classes and (a.positives == first.positives).all() for _, a in pairs)
    table = Table(title=f"per-class val AP of the best checkpoint (weakest {len(t.weak)} in red"
                        f"{', sorted by the mean over runs' if many else ''})")
    table.add_column("class")
    if same_split:
        table.add_column("val positives", justify="right")
    for run, _ in pairs:
        table.add_column(escape(run.label) if many else "AP", justify="right")
    if many:
        table.add_column("mean", justify="right")
    table.add_column("rank", justify="right")
    positives = dict(zip(first.classes, first.positives))
    for rank, c in enumerate(t.order, start=1):
        cells = [escape(t.classes[c])]
        if same_split:
            cells.append(str(int(positives[t.classes[c]])))
        cells += [_num(v) for v in t.matrix[c]]
        if many:
            cells.append(_num(t.mean[c]))
        cells.append("-" if math.isnan(t.mean[c]) else str(rank))
        table.add_row(*cells, style="bold red" if c in t.weak else None)
    print_table(table)


def _print_ensembles(result) -> None:
    table = Table(title="ensembles")
    for col in ("result", "members", "weighting", "val mAP", "equal weights", "train time", "img/s", "seconds",
                "device", "precision"):
        table.add_column(col, justify="left" if col in ("result", "weighting", "device", "precision") else "right")
    for e in result.ensembles:
        table.add_row(escape(str(e.path)), str(len(e.members)), e.weighting, _num(e.val_map), _num(e.equal_val_map),
                      "-" if e.train_seconds is None else clock(e.train_seconds), _speed(e.img_per_s),
                      f"{e.seconds:.1f}", escape(e.device), e.precision)
    print_table(table)
