"""The `predict`, `ensemble` and `benchmark-fp16` commands: parse, call `aicoss_cli.ensemble`, print.

Plain functions with annotated parameters, registered on the app by `cli.py`. Nothing heavy is
imported at module level (torch is imported by the jobs), so `aicoss --help` stays instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.console import err, note, out, progress_display

WORKERS_HELP = ("Loader processes (default: none on the CPU, where decoding inline costs least as processes "
                "would compete with the model for the cores; min(8, cores-1) on CUDA). 0 on CUDA: one decode thread.")
DEVICE_HELP = "auto (CUDA when present) | cpu | cuda | cuda:N."


def _progress():
    return progress_display(err, transient=True)


def _fmt_map(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


# --------------------------------------------------------------------------- predict


def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by `aicoss train`.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: \\[data] root of the checkpoint's recipe).")] = None,
    split: Annotated[str, typer.Option("--split", help="test: the submission; val: the checkpoint's own val split, with val mAP and per-class AP.")] = "test",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="CSV to write (default: predictions_<checkpoint name>_<split>.csv beside the checkpoint; an input file is never overwritten). With --split val, per_class_ap.csv goes beside it.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | bf16 (fp16 needs CUDA: bf16 on the CPU).")] = "fp32",
    tta: Annotated[str, typer.Option("--tta", help="none | hflip | flips: average the sigmoid outputs of the flipped views.")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", min=0, help=WORKERS_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
) -> None:
    """Predict with one checkpoint: a submission with the exact columns and row order of
    sample_submission.csv, or (--split val) the val mAP and a per-class AP table.

    Example: [bold]aicoss predict runs/demo/<timestamp>/best.safetensors --split val --tta hflip[/]
    """
    from aicoss_cli.predict import run_predict

    with _progress() as progress:
        result = run_predict(checkpoint, data=data, split=split, out=out_path, precision=precision, tta=tta,
                             batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    for text in result.notes:
        note(text)
    speed = result.n_images / result.loop_seconds if result.loop_seconds > 0 else float("nan")
    if result.val_map is not None:
        _print_per_class(result)
    what = "val predictions" if result.split == "val" else "submission"
    out.print(f"{what}: {escape(str(result.out))} ({result.n_images} images × {len(result.classes)} classes; "
              f"{escape(result.runtime)}, tta {result.tta}; {result.seconds:.1f} s in all, {speed:.0f} img/s)", highlight=False)


def _print_per_class(result) -> None:
    rows = result.per_class
    ranked = [r for r in rows if r["rank"] is not None]
    n_weak = min(5, max(1, len(ranked) // 5))
    out.print(f"per-class AP on the val split of {escape(str(result.checkpoint))} (weakest {n_weak} in red)",
              highlight=False)
    table = Table()
    for col in ("class", "positives", "AP", "rank"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for r in rows:
        weak = r["rank"] is not None and r["rank"] <= n_weak
        table.add_row(escape(r["class"]), str(r["positives"]), _fmt_map(r["ap"]),
                      "-" if r["rank"] is None else str(r["rank"]), style="bold red" if weak else None)
    out.print(table)
    skipped = len(rows) - len(ranked)
    extra = f"; {skipped} classes without a positive are left out" if skipped else ""
    weakest = ", ".join(f"{r['class']} {r['ap']:.4f}" for r in sorted(ranked, key=lambda r: r["rank"])[:n_weak])
    out.print(f"val mAP [bold]{result.val_map:.4f}[/] on {result.n_images} images ({len(ranked)} classes{extra}); "
              f"weakest: {escape(weakest)}", highlight=False)
    out.print(f"per-class AP: {escape(str(result.per_class_path))}", highlight=False)


# --------------------------------------------------------------------------- ensemble


def ensemble(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="Member checkpoints (default: best.safetensors of every run under --runs).", show_default=False)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="ENSEMBLE.toml: `data = DIR` (optional) and \\[\\[member]] tables with path, weight, tta (paths relative to the spec's folder).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half precision: fp16 on CUDA, bf16 on the CPU.")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="equal | auto (fit non-negative weights on val, report the gain on a held-out half). Default: the spec's weights, else equal.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the spec's `data`, else the first member's \\[data] root).")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Submission CSV to write (an input file is never overwritten).")] = Path("ensemble_submission.csv"),
    runs_dir: Annotated[Path, typer.Option("--runs", help="Where to look for runs when no member is named.")] = Path("runs"),
    tta: Annotated[str, typer.Option("--tta", help="none | hflip | flips for members whose spec entry sets none.")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass (all members run on each batch).")] = 64,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", min=0, help=WORKERS_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
) -> None:
    """Average the sigmoid outputs of several checkpoints (any archs and input sizes: each image is
    decoded once per batch and resized per member), report each member's and the ensemble's val mAP
    on their shared val split, and write the test submission.

    Example: [bold]aicoss ensemble --fp16[/] (every run under runs/), or
    [bold]aicoss ensemble a/best.safetensors b/best.safetensors --weights auto --out sub.csv[/]
    """
    from aicoss_cli.ensemble import run_ensemble

    with _progress() as progress:
        result = run_ensemble(checkpoints or [], spec=spec, fp16=fp16, weights=weights, data=data, out=out_path,
                              runs_dir=runs_dir, tta=tta, batch_size=batch_size, num_workers=num_workers,
                              device=device, progress=progress)
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
    for col in ("#", "checkpoint", "arch", "size", "tta", "weight", "val mAP", "at training"):
        table.add_column(col, justify="left" if col in ("checkpoint", "arch", "tta") else "right")
    for i, m in enumerate(result.members, 1):
        table.add_row(str(i), escape(m.path), m.arch, str(m.img_size), m.tta, f"{m.weight:.3f}", _fmt_map(m.val_map),
                      _fmt_map(m.stored_val_map))
    out.print(table)
    if result.val_map is not None:
        best = max((m.val_map for m in result.members if m.val_map is not None), default=float("nan"))
        in_sample = "; in-sample: the weights were fit on these images" if result.weighting == "auto" else ""
        out.print(f"ensemble val mAP ({result.weighting} weights): [bold]{result.val_map:.4f}[/] on {result.n_val} "
                  f"val images (best member {best:.4f}, equal weights {result.equal_val_map:.4f}{in_sample})",
                  highlight=False)
    if result.held_out is not None:
        h = result.held_out
        colour = "green" if h.gain > 0 else "yellow"
        out.print(f"auto weights, held out: fit on {h.n_fit} val images, scored on the other {h.n_score}: "
                  f"equal {h.equal_map:.4f} → auto {h.auto_map:.4f} ([{colour}]gain {h.gain:+.4f}[/]); "
                  f"weights used: fit on all {result.n_val}", highlight=False)
    out.print(f"submission: {escape(str(result.out))} ({result.n_test} test images; {result.seconds:.1f} s); "
              f"result: {escape(str(result.result_path))} (for `aicoss report --ensemble`)", highlight=False)


# --------------------------------------------------------------------------- benchmark-fp16


def benchmark_fp16(
    checkpoints: Annotated[list[Path], typer.Argument(help="Member checkpoints (one or more).", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the first member's \\[data] root).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N val images.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")] = False,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", min=0, help=WORKERS_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
) -> None:
    """Run the same ensemble over the same val images in fp32 and in half precision (fp16 on CUDA,
    bf16 on the CPU), each after a warm-up, and print the seed's table: inference time, img/s,
    val mAP and the difference in %, plus the largest difference of the output probabilities.

    Example: [bold]aicoss benchmark-fp16 runs/*/*/best.safetensors --limit 2000[/]
    """
    from aicoss_cli.ensemble import run_benchmark

    with _progress() as progress:
        if as_json:
            progress.disable = True
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
