"""The `export` command: parse, call `export.writer`, print.

A plain function with annotated parameters, registered on the app by `cli.app`. torch, onnx and
onnxruntime are imported by the export itself, so `aicoss --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, note, out, progress_display


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint written by `aicoss train` (or import-weights).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | safetensors-timm (the backbone in timm's naming + config.json).")] = "onnx",
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Where to write (default: beside the checkpoint, <stem>.onnx, <stem>.pt or the folder <stem>_timm/). An existing file is never overwritten without --overwrite.")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's own, 20 with torch 2.14).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision weights and arithmetic (for GPUs); input and output stay float32. Checked to 1e-2 instead of 1e-4.")] = False,
    batch: Annotated[str, typer.Option("--batch", help="dynamic (any batch size) | N (a fixed batch size).")] = "dynamic",
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root whose first test images the check runs on (default: seeded random inputs).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file; in a timm folder, only its model.safetensors and config.json (a folder holding anything else is refused). Never the checkpoint.")] = False,
) -> None:
    """Export a checkpoint to ONNX, TorchScript or timm weights, checked.

    Export a checkpoint's model to ONNX, TorchScript or timm weights, checked against PyTorch as
    it is written.

    ONNX / TorchScript: the whole model and its sigmoid, `images` (N×3×S×S, normalised) → `probabilities` (N×K).

    The file holds the checkpoint's metadata: classes, input size, mean/std, arch, recipe, split.

    Checked with ONNX Runtime (CPU), the reloaded TorchScript or timm's loader: above 1e-4 (fp16 1e-2), exit 1.

    Example: [bold]aicoss export runs/demo/<timestamp>/best.safetensors --data data/demo[/]
    """
    from aicoss_cli.export.writer import ExportCheckFailed, export_checkpoint, parse_batch

    fixed = parse_batch(batch)
    with progress_display(err, transient=True) as progress:
        task = progress.add_task("export", total=3)

        def step(text: str) -> None:
            progress.update(task, description=text, advance=0 if text.startswith("loading") else 1)

        try:
            result = export_checkpoint(checkpoint, fmt, out_path, opset=opset, fp16=fp16, batch=fixed, data=data,
                                       overwrite=overwrite, on_step=step)
        except ExportCheckFailed as exc:
            progress.stop()
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    for text in result.notes:
        note(text)
    table = Table(title=f"exported {escape(str(checkpoint))}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("file", escape(str(result.path)))
    table.add_row("format", f"{result.fmt}, {result.precision}"
                  + ("" if result.fmt == "safetensors-timm" else
                     f", batch {'dynamic' if result.batch is None else result.batch}"))
    table.add_row("size", f"{result.size_bytes / 1e6:.1f} MB")
    table.add_row("checked on", escape(result.compared))
    table.add_row("largest difference", f"{result.max_diff:.2e} in {result.quantity} (allowed {result.tolerance:g}): ok")
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)
