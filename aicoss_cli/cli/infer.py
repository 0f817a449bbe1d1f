"""The `predict`, `ensemble` and `benchmark-fp16` commands: parse, call the `infer` job, print.

Plain functions with annotated parameters, registered on the app by `cli.app`. Nothing heavy is
imported at module level (torch is imported by the jobs), so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, note, out, print_table, progress_display
from aicoss_cli.cli.options import AsJson, BatchSize, Device, Labels, NumWorkers, Overwrite


def _progress(enabled: bool = True):
    return progress_display(err, enabled=enabled, transient=True)


def _fmt_map(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# --------------------------------------------------------------------------- predict


def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by `aicoss train`.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: \\[data] root of the checkpoint's recipe).")] = None,
    split: Annotated[Literal["test", "val"], typer.Option("--split", help="test: the submission; val: the checkpoint's own val split, with val mAP and per-class AP.")] = "test",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (default: predictions_<checkpoint name>_<split>.csv beside the checkpoint). With --split val, <out stem>_per_class.csv goes beside it.")] = None,
    precision: Annotated[Literal["fp32", "fp16", "bf16"], typer.Option("--precision", help="fp16 needs CUDA: bf16 on the CPU.")] = "fp32",
    tta: Annotated[Literal["none", "hflip", "flips"], typer.Option("--tta", help="Average the sigmoid outputs of the flipped views (hflip: 2, flips: 4).")] = "none",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per forward pass (default: the batch its run validated with, so --split val gives its val_scores.csv byte for byte; else 64).", show_default=False)] = None,
    num_workers: NumWorkers = None,
    device: Device = "auto",
    labels: Labels = None,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
) -> None:
    """Predict with one checkpoint: a submission, or val mAP per class.

    Predict with one checkpoint: a submission with the exact columns and row order of
    sample_submission.csv, or (--split val) the val mAP and a per-class AP / F1 table; with
    --labels also the 0/1 labels.

    Example: [bold]aicoss predict runs/demo/<timestamp>/best.safetensors --split val --tta hflip[/]
    """
    from aicoss_cli.infer.predict import run_predict

    with _progress(enabled=not as_json) as progress:
        result = run_predict(checkpoint, data=data, split=split, out=out_path, precision=precision, tta=tta,
                             batch_size=batch_size, num_workers=num_workers, device=device, labels=labels,
                             overwrite=overwrite, progress=progress)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    for text in result.notes:
        note(text)
    if result.val_map is not None:
        _print_per_class(result.per_class, f"the val split of {result.checkpoint}")
        _print_val_map(result.val_map, result.n_images, result.per_class)
        out.print(f"per-class table: {escape(str(result.per_class_path))}", highlight=False)
    _print_labels(result.thresholds, result.labels_path, result.thresholds_path)
    speed = result.img_per_s or float("nan")
    what = "val predictions" if result.split == "val" else "submission"
    out.print(f"{what}: {escape(str(result.out))} ({result.n_images} images × {len(result.classes)} classes; "
              f"{escape(result.runtime)}, tta {result.tta}; {result.seconds:.1f} s in all, {speed:.0f} img/s)", highlight=False)


def _print_per_class(rows: list[dict], where: str) -> None:
    """Per-class AP, F1, precision and recall at the thresholds, in class order; the weakest APs in red."""
    ranked = [r for r in rows if r["rank"] is not None]
    n_weak = min(5, max(1, len(ranked) // 5))
    same = len({r["threshold"] for r in rows}) == 1
    at = f"at threshold {rows[0]['threshold']:g}" if same and rows else "at per-class thresholds"
    out.print(f"per class on {escape(where)}: AP, and F1 / precision / recall {at} (weakest {n_weak} AP in red)",
              highlight=False)
    table = Table()
    columns = ("class", "positives", "AP", "F1", "precision", "recall", *(() if same else ("threshold",)), "rank")
    for col in columns:
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in rows:
        weak = r["rank"] is not None and r["rank"] <= n_weak
        cells = [escape(r["class"]), str(r["positives"]), _fmt_map(r["ap"]), f"{r['f1']:.4f}", f"{r['precision']:.4f}",
                 f"{r['recall']:.4f}", *(() if same else (f"{r['threshold']:.3g}",)),
                 "-" if r["rank"] is None else str(r["rank"])]
        table.add_row(*cells, style="bold red" if weak else None)
    print_table(table)


def _print_val_map(val_map: float, n_images: int, rows: list[dict]) -> None:
    ranked = [r for r in rows if r["rank"] is not None]
    n_weak = min(5, max(1, len(ranked) // 5))
    skipped = len(rows) - len(ranked)
    extra = f"; {skipped} classes without a positive are left out" if skipped else ""
    weakest = ", ".join(f"{r['class']} {r['ap']:.4f}" for r in sorted(ranked, key=lambda r: r["rank"])[:n_weak])
    out.print(f"val mAP [bold]{val_map:.4f}[/] on {n_images} images ({len(ranked)} classes{extra}); "
              f"weakest: {escape(weakest)}", highlight=False)


def _print_labels(th, labels_path, thresholds_path, images: str = "val images") -> None:
    """Where the 0/1 labels went, the thresholds' source, the fallback classes and the held-out gain
    (fit on some `images`, scored on the others)."""
    if th is None:
        return
    if th.fallback:
        note(f"{len(th.fallback)} classes have too few val positives for a threshold of their own and take the "
             f"best single threshold {th.global_threshold:.3g}: {', '.join(th.fallback[:8])}"
             f"{' ...' if len(th.fallback) > 8 else ''}")
    h = th.held_out
    if h is not None:
        colour = "green" if h.gain > 0 else "yellow"
        out.print(f"per-class thresholds, held out: fit on {h.n_fit} {images}, scored on the other {h.n_score}: "
                  f"macro F1 {h.global_f1:.4f} at the best single threshold {h.global_threshold:.3g} → "
                  f"{h.auto_f1:.4f} per class ([{colour}]gain {h.gain:+.4f}[/])", highlight=False)
        if h.gain < 0:
            note("per-class thresholds score below one global threshold on the held-out half: they fit noise of "
                 "this val split; prefer --labels with the global threshold here")
    out.print(f"labels ({escape(th.source)}): {escape(str(labels_path))}; thresholds: {escape(str(thresholds_path))}",
              highlight=False)


# --------------------------------------------------------------------------- ensemble


def ensemble(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="Member checkpoints (default: the kept checkpoint of every run under --runs, best.safetensors unless its recipe keeps the last).", show_default=False)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="ENSEMBLE.toml: `data = DIR` (optional) and \\[\\[member]] tables with path, weight, tta (paths relative to the spec's folder).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half precision: fp16 on CUDA, bf16 on the CPU.")] = False,
    weights: Annotated[Optional[Literal["equal", "auto"]], typer.Option("--weights", help="auto: fit non-negative weights on val, report the gain on a held-out half. Default: the spec's weights, else equal.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the spec's `data`, else the first member's \\[data] root).")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Submission CSV to write; <out stem>.json (the result, for `aicoss report --ensemble`) and, with a val split, <out stem>_per_class.csv go beside it.")] = Path("ensemble_submission.csv"),
    runs_dir: Annotated[Path, typer.Option("--runs", help="Where to look for runs when no member is named.")] = Path("runs"),
    tta: Annotated[Literal["none", "hflip", "flips"], typer.Option("--tta", help="TTA of the members whose spec entry sets none.")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass (all members run on each batch).")] = 64,
    num_workers: NumWorkers = None,
    device: Device = "auto",
    labels: Labels = None,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
) -> None:
    """Average several checkpoints; each member's and the ensemble's val mAP.

    Average the sigmoid outputs of several checkpoints (any archs and input sizes: each image is
    decoded once per batch and resized per member), report each member's and the ensemble's val mAP
    on their shared val split, and write the test submission.

    Example: [bold]aicoss ensemble --fp16[/] (every run under runs/), or
    [bold]aicoss ensemble a/best.safetensors b/best.safetensors --weights auto --out sub.csv[/]
    """
    from aicoss_cli.infer.ensemble import run_ensemble

    with _progress(enabled=not as_json) as progress:
        result = run_ensemble(checkpoints or [], spec=spec, fp16=fp16, weights=weights, data=data, out=out_path,
                              runs_dir=runs_dir, tta=tta, batch_size=batch_size, num_workers=num_workers,
                              device=device, labels=labels, overwrite=overwrite, progress=progress)
    if as_json:
        print(json.dumps({**result.to_json(), "notes": result.notes}, indent=2))
        return
    if result.discovery is not None:
        d = result.discovery
        out.print(f"members from {escape(str(runs_dir))}: took {len(d.taken)} run(s) matching {escape(str(d.data_root))}",
                  highlight=False)
        for path, why in d.skipped:
            out.print(f"  [dim]skipped[/] {escape(str(path))}: {escape(why)}", highlight=False)
    for text in result.notes:
        note(text)
    out.print(f"ensemble of {len(result.members)} members ({escape(result.runtime)})", highlight=False)
    table = Table()
    columns = ("#", "CV folder", "arch", "size", "tta", "weight", "out-of-fold mAP", "folds' val mAP", "model img/s") \
        if result.out_of_fold else ("#", "checkpoint", "arch", "size", "tta", "weight", "val mAP", "at training",
                                    "model img/s")
    for col in columns:
        table.add_column(col, justify="left" if col in ("checkpoint", "CV folder", "arch", "tta") else "right")
    for i, m in enumerate(result.members, 1):
        table.add_row(str(i), escape(m.path), m.arch, str(m.img_size), m.tta, f"{m.weight:.3f}", _fmt_map(m.val_map),
                      _fmt_map(m.stored_val_map), "-" if m.img_per_s is None else f"{m.img_per_s:.1f}")
    print_table(table)
    images = "out-of-fold images (whole folds)" if result.out_of_fold else "val images"
    if result.val_map is not None:
        best = max((m.val_map for m in result.members if m.val_map is not None), default=float("nan"))
        in_sample = "; in-sample: the weights were fit on these images" if result.weighting == "auto" else ""
        what = "out-of-fold mAP" if result.out_of_fold else "val mAP"
        where = "training images, each predicted by the folds that did not train on it" if result.out_of_fold \
            else "val images"
        out.print(f"ensemble {what} ({result.weighting} weights): [bold]{result.val_map:.4f}[/] on {result.n_val} "
                  f"{where} (best member {best:.4f}, equal weights {result.equal_val_map:.4f}{in_sample})",
                  highlight=False)
    if result.per_class:
        where = "the members' out-of-fold predictions" if result.out_of_fold else "the members' val split"
        _print_per_class(result.per_class, f"{where}, the ensemble ({result.weighting} weights)")
        out.print(f"per-class table: {escape(str(result.per_class_path))}", highlight=False)
    _print_labels(result.thresholds, result.labels_path, result.thresholds_path, images)
    if result.held_out is not None:
        h = result.held_out
        colour = "green" if h.gain > 0 else "yellow"
        out.print(f"auto weights, held out: fit on {h.n_fit} {images}, scored on the other {h.n_score}: "
                  f"equal {h.equal_map:.4f} → auto {h.auto_map:.4f} ([{colour}]gain {h.gain:+.4f}[/]); "
                  f"weights used: fit on all {result.n_val}", highlight=False)
    out.print(f"submission: {escape(str(result.out))} ({result.n_test} test images; {result.seconds:.1f} s); "
              f"result: {escape(str(result.result_path))} (for `aicoss report --ensemble`)", highlight=False)


# --------------------------------------------------------------------------- benchmark-fp16


def benchmark_fp16(
    checkpoints: Annotated[list[Path], typer.Argument(help="Member checkpoints (one or more).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the first member's \\[data] root).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N val images.")] = None,
    batch_size: BatchSize = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")] = False,
    num_workers: NumWorkers = None,
    device: Device = "auto",
) -> None:
    """Run an ensemble in fp32 and half precision: time, img/s, val mAP.

    Run the same ensemble over the same val images in fp32 and in half precision (fp16 on CUDA,
    bf16 on the CPU), each after a warm-up, and print the seed's table: inference time, img/s,
    val mAP and the difference in %, plus the largest difference of the output probabilities.

    Example: [bold]aicoss benchmark-fp16 runs/*/*/best.safetensors --limit 2000[/]
    """
    from aicoss_cli.infer.benchmark import run_benchmark

    with _progress(enabled=not as_json) as progress:
        r = run_benchmark(checkpoints, data=data, limit=limit, batch_size=batch_size, num_workers=num_workers,
                          device=device, progress=progress)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    for text in r["notes"]:
        note(text)
    half = r["half_dtype"].upper()
    out.print(f"{len(r['members'])}-model ensemble, {r['images']} val images, batch {r['batch_size']}, "
              f"{escape(r['device'])}: FP32 vs {half}", highlight=False)
    table = Table()
    for col in ("", "FP32", half, "diff."):
        table.add_column(col, justify="center")
    a, b, d = r["fp32"], r["half"], r["diff_pct"]
    table.add_row(r"Inference time \[sec]", f"{a['seconds']:.2f}", f"{b['seconds']:.2f}", f"{d['seconds']:+.2f}%")
    table.add_row(r"Inference speed \[img/sec]", f"{a['img_per_sec']:.2f}", f"{b['img_per_sec']:.2f}",
                  f"{d['img_per_sec']:+.2f}%")
    table.add_row("val mAP", f"{a['val_map']:.5f}", f"{b['val_map']:.5f}", f"{d['val_map']:+.5f}%")
    out.print(table)
    out.print(f"largest |probability difference| FP32 vs {half}: {r['max_abs_prob_diff']:.2e} "
              f"(device {escape(r['device'])}, half dtype {r['half_dtype']}, {r['loader']})", highlight=False)
