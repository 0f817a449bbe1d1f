"""The model-side commands: count-params, import-weights, prior.

Plain functions with annotated parameters, registered on the app by `cli.app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.base.console import err, out, print_table
from aicoss_cli.cli.options import BatchSize, Device, Overwrite


def count_params(
    archs: Annotated[Optional[list[str]], typer.Argument(help="Architectures (default: every registered one).")] = None,
    num_classes: Annotated[int, typer.Option("--classes", min=1, help="Number of classes.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable rows.")] = False,
) -> None:
    """Parameters of every architecture: Backbone / Decoder / Params (M).

    Table Backbone / Decoder / Params (M) of every architecture, built on the meta device (no memory).

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
    print_table(table)


def import_weights(
    weights: Annotated[Path, typer.Argument(help="A seed .pt/.pth state dict (or .safetensors).")],
    arch: Annotated[str, typer.Option("--arch", help="The arch the weights were trained as (a seed --model_name).")],
    classes: Annotated[Path, typer.Option("--classes", help="Class names: a .txt (one per line) or a CSV with the header.")],
    out_file: Annotated[Path, typer.Option("--out", help="The checkpoint to write (.safetensors).")],
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=16, max=4096, help="Input size (default: the arch's); the range of \\[model] img_size.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root the weights were trained on (records its val split).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (default: refuse).")] = False,
) -> None:
    """Turn a seed state dict into an aicoss checkpoint with metadata.

    Turn a seed state dict into an aicoss checkpoint with metadata, for predict and ensemble.

    The file is read with torch.load(weights_only=True): nothing is unpickled. The split recorded is
    the seed's (random, 10 % val, random_state 78).

    Example: [bold]aicoss import-weights tresnet_xl_pasl.pt --arch tresnet_xl_mldecoder --classes data/aicoss/train.csv --out tresnet_xl_pasl.safetensors[/]
    """
    from aicoss_cli.infer.import_weights import import_weights as run_import

    r = run_import(weights, arch=arch, classes=classes, out=out_file, img_size=img_size, data=data,
                   overwrite=overwrite)
    out.print(f"wrote {r.out}: {r.arch}, {len(r.classes)} classes, {r.tensors} tensors, img_size {r.img_size}",
              highlight=False)


def prior(
    checkpoint: Annotated[Path, typer.Argument(help="A trained checkpoint (.safetensors).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the checkpoint's recipe's).")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write Classes,avg_pred.")] = Path("prior.csv"),
    batch_size: BatchSize = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """A model's mean prediction on the training split: a P-ASL class prior.

    Mean sigmoid prediction of a model over the training split: the class prior for P-ASL.

    Use the CSV with \\[loss] prior = "prior.csv" (partial_selective, partial_mode = "selective").

    Example: [bold]aicoss prior runs/demo/20260101T000000Z/best.safetensors --data data/demo --out prior.csv[/]
    """
    from aicoss_cli.base.console import progress_display
    from aicoss_cli.train.prior import run_prior

    with progress_display(err, transient=True) as progress:
        result = run_prior(checkpoint, data=data, out=out_file, batch_size=batch_size, device=device,
                           overwrite=overwrite, progress=progress)
    table_out = Table(title=f"class prior ({result.n_images} training images) → {out_file}", title_justify="left")
    table_out.add_column("class")
    table_out.add_column("avg_pred", justify="right")
    for name, value in zip(result.classes, result.values):
        table_out.add_row(escape(name), f"{value:.4f}")
    print_table(table_out)
