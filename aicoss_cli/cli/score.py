"""The `score` command: parse, call `evaluation.score.score_files`, print.

A plain function with annotated parameters, registered on the app by `cli.app`. It imports no
torch at all: scoring two CSVs needs numpy and the csv module only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import out, print_table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def score(
    predictions: Annotated[Path, typer.Argument(help="Submission-shaped CSV: img_id + one probability column per class.", show_default=False)],
    labels: Annotated[Path, typer.Argument(help="Known labels in the same shape (e.g. test_labels.csv, or a train.csv: img_path is ignored, -1 = not annotated and left out).", show_default=False)],
    thresholds: Annotated[str, typer.Option("--thresholds", help="T: one threshold for every class, or a class,threshold CSV (e.g. the _thresholds.csv of --labels auto). A class is predicted when probability ≥ its threshold.")] = "0.5",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")] = False,
) -> None:
    """Score a submission against known labels: mAP, F1, precision, recall.

    Score a submission against known labels: macro mAP, micro and macro F1 / precision / recall
    at the thresholds, and a per-class table (AP, F1, precision, recall, support), weakest first.

    Rows are matched by img_id in any order, class columns by name.

    Example: [bold]aicoss score submission.csv data/demo/test_labels.csv --thresholds 0.4[/]
    """
    from aicoss_cli.evaluation.score import score_files

    report = score_files(predictions, labels, thresholds)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    rows = report["per_class"]
    n_weak = min(5, max(1, report["classes_scored"] // 5))
    table = Table(title=f"per class, weakest first (weakest {n_weak} in red)", title_justify="left")
    for col in ("rank", "class", "support", "AP", "F1", "precision", "recall", "threshold"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in rows:
        weak = r["rank"] is not None and r["rank"] <= n_weak
        table.add_row("-" if r["rank"] is None else str(r["rank"]), escape(r["class"]), str(r["positives"]),
                      _fmt(r["ap"]), _fmt(r["f1"]), _fmt(r["precision"]), _fmt(r["recall"]), f"{r['threshold']:.4g}",
                      style="bold red" if weak else None)
    print_table(table)
    out.print(f"{escape(report['predictions'])} against {escape(report['labels'])}: {report['images']} images, "
              f"thresholds {escape(report['thresholds'])}", highlight=False)
    summary = Table()
    for col in ("", "F1", "precision", "recall"):
        summary.add_column(col, justify="left" if not col else "right")
    for kind in ("micro", "macro"):
        m = report[kind]
        summary.add_row(kind, _fmt(m["f1"]), _fmt(m["precision"]), _fmt(m["recall"]))
    print_table(summary)
    skipped = report["classes"] - report["classes_scored"]
    extra = f"; {skipped} classes without a positive are left out of mAP and the macro means" if skipped else ""
    out.print(f"macro mAP [bold]{_fmt(report['map'])}[/] over {report['classes_scored']} classes{extra}",
              highlight=False)
