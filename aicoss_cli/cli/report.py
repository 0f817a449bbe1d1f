"""The `report` command: parse, call `results.report.build_report`, print the tables.

A plain function with annotated parameters, registered on the app by `cli.app`. matplotlib and
the run readers are imported inside the command, so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import clock, err, note, out, print_table
from aicoss_cli.cli.cv import print_folds


def report(
    run_dirs: Annotated[Optional[list[Path]], typer.Argument(help="Run folders runs/<recipe name>/<timestamp> (one still training is fine), or one prediction CSV (with --labels). Optional with --ensemble: then its members' runs.", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for the pictures (default: the run's folder for one run, else ./report). A file there that aicoss report did not write is never replaced.")] = None,
    ensembles: Annotated[Optional[list[Path]], typer.Option("--ensemble", help="An `aicoss ensemble` result JSON (<out stem>.json beside its CSV); repeatable.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root: the labels of a run's images, and where the images are (default: \\[data] root of each run's recipe; for a prediction CSV, the --labels file's folder).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Known labels of a prediction CSV, as `aicoss score` takes them (train.csv for an oof.csv, test_labels.csv for a test submission).")] = None,
    split: Annotated[Literal["val", "test"], typer.Option("--split", help="A run's scores to analyse: val (val_scores.csv against train.csv) or test (submission.csv against test_labels.csv).")] = "val",
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Also draw errors_<class>.png for these classes (a,b; repeatable).")] = None,
    thresholds: Annotated[str, typer.Option("--thresholds", help="T for every class, a class,threshold CSV, or auto (fit on the same images): decisions are score ≥ threshold (what counts as a false positive or negative).")] = "0.5",
    worst: Annotated[int, typer.Option("--worst", min=1, help="Classes in errors.png: the worst by AP.")] = 6,
    per_row: Annotated[int, typer.Option("--per-row", min=1, max=30, help="Thumbnails per row of the gallery.")] = 8,
    suspect_below: Annotated[float, typer.Option("--suspect-below", min=0.0, max=1.0, help="A positive label scored below this is a suspect.")] = 0.02,
    suspect_above: Annotated[float, typer.Option("--suspect-above", min=0.0, max=1.0, help="A negative label scored above this is a suspect.")] = 0.98,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON only (notes go to stderr).")] = False,
) -> None:
    """Summarise runs and ensembles: a table, curves, per-class AP pictures.

    Summarise runs and draw curves.png (losses and val mAP per epoch), per_class_ap.png (best
    checkpoint's val AP per class, weakest marked) and ensemble_tradeoff.png (val mAP against
    training time and inference speed), and write report.html, one page holding them all.

    Where labels are known (one run's val split, or one prediction CSV with --labels) also the
    error analysis: errors.png (false positives and negatives of the worst classes, as
    thumbnails), pr_curves.png, cooccurrence.png (the true labels of each class's false
    positives) and suspect_labels.csv (labels the model contradicts with confidence).

    A cross-validation folder stands for its K fold runs, and adds cv_per_class_ap.png (per-class
    AP over the folds: mean ± std, and out-of-fold) and the per-fold table.

    Example: [bold]aicoss report runs/demo/* --ensemble ensemble_submission.json --out report[/]
    Example: [bold]aicoss report runs/demo/20250101T000000Z --data data/demo --classes digit_3[/]
    """
    from aicoss_cli.results.errors import ErrorOptions
    from aicoss_cli.results.report import build_report, report_json

    options = ErrorOptions(labels=labels, split=split, classes=classes or [], thresholds=thresholds, worst=worst,
                           per_row=per_row, suspect_below=suspect_below, suspect_above=suspect_above)
    result = build_report(run_dirs or [], out=out_dir, ensembles=ensembles or [], data=data, errors=options)
    if as_json:
        for text in result.notes:
            note(text, err)
        print(json.dumps(report_json(result), indent=2, allow_nan=False))
        return
    _print_runs(result)
    _print_class_ap(result)
    if result.ensembles:
        _print_ensembles(result)
    if result.analysis is not None:
        _print_errors(result.analysis)
    for cv in result.cvs:
        print_folds(cv)
    if result.distilled:
        from aicoss_cli.cli.distill import print_teachers

        for run, record in result.distilled:
            print_teachers(run, record)
    for text in result.notes:
        note(text)
    for path in result.pictures.values():
        out.print(f"picture: {escape(str(path))}", highlight=False)
    if "suspect_labels" in result.files:
        out.print(f"suspect labels: {escape(str(result.files['suspect_labels']))} "
                  f"({len(result.analysis.suspects[0])} rows)", highlight=False)
    out.print(f"page: {escape(str(result.files['html']))}", highlight=False)


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


def _print_errors(a) -> None:
    table = Table(title=f"errors on {escape(a.data.source)}, worst classes by AP "
                        f"(threshold {escape(a.thresholds.source)})")
    for col in ("class", "positives", "AP", "F1", "false positives", "false negatives"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for g in a.worst:
        row = a.per_class[g.cls]
        table.add_row(escape(row["class"]), str(row["positives"]), _num(row["ap"]), _num(row["f1"]), str(g.n_fp),
                      str(g.n_fn))
    out.print(table)
    out.print(f"{len(a.data.ids)} images, macro mAP {_num(a.map)}, macro F1 {_num(a.macro_f1)}; "
              f"{len(a.suspects[0])} suspect labels (positive < {a.options.suspect_below:g} or negative > "
              f"{a.options.suspect_above:g})", highlight=False)


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
