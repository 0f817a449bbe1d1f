"""The model-side commands: count-params, import-weights, prior.

Plain functions with annotated parameters, registered on the app by `cli.py`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aicoss_cli.console import err, out
from aicoss_cli.errors import UserError


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


def _recipe_name(out_file: Path) -> str:
    """A recipe name (letters, digits and _.+- , starting with a letter or digit) from the output
    file's name: `modèle.safetensors` → `mod_le`, `_weights.safetensors` → `weights`."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", out_file.stem).lstrip("_.+-")[:120]
    return name or "imported"


def import_weights(
    weights: Annotated[Path, typer.Argument(help="A seed .pt/.pth state dict (or .safetensors).")],
    arch: Annotated[str, typer.Option("--arch", help="The arch the weights were trained as (a seed --model_name).")],
    classes: Annotated[Path, typer.Option("--classes", help="Class names: a .txt (one per line) or a CSV with the header.")],
    out_file: Annotated[Path, typer.Option("--out", help="The checkpoint to write (.safetensors).")],
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=16, max=4096, help="Input size (default: the arch's); the range of \\[model] img_size.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root the weights were trained on (records its val split).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (default: refuse).")] = False,
) -> None:
    """Turn a seed state dict into an aicoss checkpoint with metadata, for predict and ensemble.

    The file is read with torch.load(weights_only=True): nothing is unpickled. The split recorded is
    the seed's (random, 10 % val, random_state 78).

    Example: [bold]aicoss import-weights tresnet_xl_pasl.pt --arch tresnet_xl_mldecoder --classes data/aicoss/train.csv --out tresnet_xl_pasl.safetensors[/]
    """
    from aicoss_cli.checkpoint import CheckpointMeta, check_outputs, load_weights, save_checkpoint
    from aicoss_cli.models import ARCHS, build_model, default_img_size, load_state_dict_file
    from aicoss_cli.recipe import recipe_to_toml, validate_recipe

    check_outputs([out_file], [weights, classes], overwrite)
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(arch, list(ARCHS), n=3, cutoff=0.5)
        raise UserError(f"--arch: unknown architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    names = _read_class_names(classes)
    size = img_size or default_img_size(arch)
    state = load_state_dict_file(weights)
    model = build_model(arch, len(names), pretrained=False, img_size=size)
    load_weights(model, state, str(weights), f"arch {arch!r} with {len(names)} classes ({classes})")
    recipe = validate_recipe({"name": _recipe_name(out_file), "description": f"imported from {weights.name}",
                              "model": {"arch": arch, "img_size": size},
                              "data": {"root": str(data) if data else "data/aicoss"}}, source="import-weights")
    split = {"kind": "random", "val_fraction": 0.1, "split_seed": 78}
    if data is not None:
        from aicoss_cli.data import read_train
        from aicoss_cli.splits import split_fingerprint, split_indices

        table = read_train(data)
        if table.classes != names:
            raise UserError(f"{data}/train.csv: its classes differ from {classes}")
        _, val = split_indices(table.labels, "random", 0.1, 78)
        split.update(n_rows=len(table), n_val=int(len(val)), val_fingerprint=split_fingerprint(table.ids, val))
    meta = CheckpointMeta(arch=arch, img_size=size, classes=names, recipe_toml=recipe_to_toml(recipe), split=split,
                          extra={"imported_from": str(weights)})
    save_checkpoint(out_file, model.state_dict(), meta)
    out.print(f"wrote {out_file}: {arch}, {len(names)} classes, {len(state)} tensors, img_size {size}", highlight=False)


def prior(
    checkpoint: Annotated[Path, typer.Argument(help="A trained checkpoint (.safetensors).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Data root (default: the checkpoint's recipe's).")] = None,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write Classes,avg_pred.")] = Path("prior.csv"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (default: refuse).")] = False,
) -> None:
    """Mean sigmoid prediction of a model over the training split: the class prior for P-ASL.

    Use the CSV with \\[loss] prior = "prior.csv" (partial_selective, partial_mode = "selective").

    Example: [bold]aicoss prior runs/demo/20260101T000000Z/best.safetensors --data data/demo --out prior.csv[/]
    """
    from aicoss_cli.console import progress_display
    from aicoss_cli.predict import run_prior

    with progress_display(err, transient=True) as progress:
        result = run_prior(checkpoint, data=data, out=out_file, batch_size=batch_size, device=device,
                           overwrite=overwrite, progress=progress)
    table_out = Table(title=f"class prior ({result.n_images} training images) → {out_file}", title_justify="left")
    table_out.add_column("class")
    table_out.add_column("avg_pred", justify="right")
    for name, value in zip(result.classes, result.values):
        table_out.add_row(escape(name), f"{value:.4f}")
    out.print(table_out)
