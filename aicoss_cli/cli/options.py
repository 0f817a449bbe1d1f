"""Options several commands share, declared once as annotated types (Typer's idiom): a command
writes `device: Device = "auto"` and gets the same flag, range and help text as every other."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

WORKERS_HELP = ("Loader processes (default: none on the CPU, where one decode thread beside the model costs least; "
                "min(8, cores-1) on CUDA). 0: one decode thread.")
LABELS_HELP = ("Also write 0/1 labels (<out stem>_labels.csv) and the thresholds used (<out stem>_thresholds.csv): "
               "T (one threshold for every class), a class,threshold CSV, or auto (per class, F1-optimal on the val "
               "split, with the gain measured on a held-out half).")

Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N.")]
NumWorkers = Annotated[Optional[int], typer.Option("--num-workers", min=0, help=WORKERS_HELP)]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
Labels = Annotated[Optional[str], typer.Option("--labels", help=LABELS_HELP)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist (default: refuse).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")]
