"""`aicoss import-weights`: a seed state dict (`.pt` / `.pth`, or `.safetensors`) turned into an
aicoss checkpoint with the metadata `predict` and `ensemble` need: arch, input size, classes, a
recipe, and the seed's val split (verified against the data when it is given).

The file is read with `torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import check_outputs
from aicoss_cli.data.splits import SEED_SPLIT, split_record
from aicoss_cli.data.tables import read_train
from aicoss_cli.models.checkpoint import CheckpointMeta, load_weights, save_checkpoint
from aicoss_cli.models.pretrained import load_state_dict_file
from aicoss_cli.models.registry import ARCHS, build_model, default_img_size
from aicoss_cli.recipe import recipe_to_toml, validate_recipe


@dataclass
class Imported:
    out: Path
    arch: str
    classes: list[str]
    tensors: int
    img_size: int


def read_class_names(path: Path) -> list[str]:
    """Class names from a .txt (one per line) or a CSV header (columns after img_id/img_path)."""
    if not path.is_file():
        raise UserError(f"{path}: class list not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(io.StringIO(text)), []) if text.strip() else []
        names = [c.strip() for c in header if c.strip() not in ("img_id", "img_path")]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"{path}: no class names (a .txt with one per line, or a CSV header such as train.csv's)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{path}: class {dup!r} is listed twice")
    return names


def recipe_name(out_file: Path) -> str:
    """A recipe name (letters, digits and _.+- , starting with a letter or digit) from the output
    file's name: `modèle.safetensors` → `mod_le`, `_weights.safetensors` → `weights`."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", out_file.stem).lstrip("_.+-")[:120]
    return name or "imported"


def import_weights(weights: Path, *, arch: str, classes: Path, out: Path, img_size: int | None = None,
                   data: Path | None = None, overwrite: bool = False) -> Imported:
    """Load `weights` into `arch` (strictly: every key, every shape) and write it as a checkpoint at
    `out`, recording the seed's split (random, 10 % val, random_state 78); with `data`, the split's
    rows and fingerprint on that train.csv, whose classes must be those of `classes`."""
    weights, classes, out = Path(weights), Path(classes), Path(out)
    check_outputs([out], [weights, classes], overwrite)
    if arch not in ARCHS:
        close = difflib.get_close_matches(arch, list(ARCHS), n=3, cutoff=0.5)
        raise UserError(f"--arch: unknown architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    names = read_class_names(classes)
    size = img_size or default_img_size(arch)
    state = load_state_dict_file(weights)
    model = build_model(arch, len(names), pretrained=False, img_size=size)
    load_weights(model, state, str(weights), f"arch {arch!r} with {len(names)} classes ({classes})")
    recipe = validate_recipe({"name": recipe_name(out), "description": f"imported from {weights.name}",
                              "model": {"arch": arch, "img_size": size},
                              "data": {"root": str(data) if data else "data/aicoss"}}, source="import-weights")
    split = dict(SEED_SPLIT)
    if data is not None:
        table = read_train(data)
        if table.classes != names:
            raise UserError(f"{Path(data) / 'train.csv'}: its classes differ from {classes}")
        split = split_record(table, SEED_SPLIT["kind"], SEED_SPLIT["val_fraction"], SEED_SPLIT["split_seed"])[2]
    meta = CheckpointMeta(arch=arch, img_size=size, classes=names, recipe_toml=recipe_to_toml(recipe), split=split,
                          extra={"imported_from": str(weights)})
    save_checkpoint(out, model.state_dict(), meta)
    return Imported(out, arch, names, len(state), size)
