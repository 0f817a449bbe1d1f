"""The embedded demo data set: real handwritten digit scans, in the DACON layout, with no download.

Each image is a 2×2 mosaic with 1–4 digits from scikit-learn's `load_digits` scans in random
cells; its labels say which of the 10 digits appear. Train and test mosaics are drawn from
disjoint source scans, so the test score measures generalisation to unseen handwriting.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import check_writable_folder, new_folder

CLASSES = [f"digit_{d}" for d in range(10)]
STAMP = "demo.json"


def _mosaic(rng: np.random.Generator, pool: np.ndarray, pool_targets: np.ndarray, size: int):
    cell = size // 2
    canvas = np.zeros((size, size), dtype=np.float32)
    labels = np.zeros(10, dtype=np.int8)
    cells = rng.choice(4, size=int(rng.integers(1, 5)), replace=False)
    for c in cells:
        k = int(rng.integers(len(pool)))
        scan = Image.fromarray((pool[k] * (255.0 / 16.0)).astype(np.uint8))
        glyph = np.asarray(scan.resize((cell, cell), Image.BILINEAR), dtype=np.float32)
        y, x = divmod(int(c), 2)
        canvas[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = glyph * rng.uniform(0.7, 1.0)
        labels[pool_targets[k]] = 1
    canvas += rng.normal(0.0, 6.0, canvas.shape)  # scanner noise, so JPEG artefacts are not the only texture
    rgb = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return Image.fromarray(rgb), labels


def build_demo_data(out: str | Path, n_train: int = 3000, n_test: int = 1000, size: int = 64, seed: int = 0,
                    unannotated: float = 0.0, on_progress=None) -> Path:
    """Write the demo set to `out` (created atomically: a temporary folder renamed at the end).

    `unannotated` marks that fraction of the train labels as -1 (not annotated), for partial-label
    losses. An existing folder is never overwritten; one built with the same settings is reused.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    settings = {"n_train": n_train, "n_test": n_test, "size": size, "seed": seed, "unannotated": unannotated}
    if reuse_existing(out, STAMP, settings, "this demo set"):
        return out
    if size < 16 or size % 2:
        raise UserError(f"--size must be an even number ≥ 16 (got {size})")
    if n_train < 10 or n_test < 1:
        raise UserError(f"--n-train must be ≥ 10 and --n-test ≥ 1 (got {n_train}, {n_test})")
    if not 0.0 <= unannotated < 1.0:
        raise UserError(f"--unannotated must be in [0, 1) (got {unannotated})")
    check_writable_folder(out.parent if out.exists() else out, "DIR")  # the set is made beside `out`, renamed to it

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_source_train = int(len(order) * 0.75)
    pools = {"train": order[:n_source_train], "test": order[n_source_train:]}

    def draw(part: str):
        pool = pools[part]
        return _mosaic(rng, digits.images[pool], digits.target[pool], size)

    def unannotate(labels: np.ndarray) -> np.ndarray:
        if unannotated <= 0:
            return labels
        labels = labels.copy()
        labels[rng.random(labels.shape) < unannotated] = -1
        return labels

    return write_image_set(out, CLASSES, {"train": n_train, "test": n_test}, draw, STAMP, settings,
                           train_labels=unannotate, on_progress=on_progress)


def reuse_existing(out: Path, stamp: str, settings: dict, what: str) -> bool:
    """True when `out` holds a set written with these `settings` (its `stamp` file says so);
    False when it is missing or empty; a UserError for any other folder (never overwritten)."""
    if not out.exists():
        return False
    stamp_file = out / stamp
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == settings:
        return True
    if any(out.iterdir()):
        raise UserError(f"{out}: folder exists and is not {what}; choose an empty or new folder")
    return False


def write_image_set(out: Path, classes: list[str], counts: dict[str, int], draw, stamp: str, settings: dict, *,
                    train_labels=None, on_progress=None) -> Path:
    """A multi-label image set in the DACON layout, written to a new folder renamed to `out` at the
    end: `counts[part]` JPEGs for part train and test, each `draw(part)` → (PIL image, 0/1 labels),
    train.csv (its labels through `train_labels`, e.g. to mark some -1), test.csv,
    sample_submission.csv, test_labels.csv and the `stamp` file holding `settings`."""
    import pandas as pd

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_folder(out)
    try:
        drawn = {}
        for part, count in counts.items():
            (tmp / part).mkdir()
            rows, labels = [], []
            for i in range(count):
                img, lab = draw(part)
                name = f"{part.upper()}_{i:05d}"
                img.save(tmp / part / f"{name}.jpg", quality=90)
                rows.append((name, f"./{part}/{name}.jpg"))
                labels.append(lab)
                if on_progress:
                    on_progress(1)
            drawn[part] = rows, np.stack(labels)
        frames = {}
        for part, (rows, labels) in drawn.items():  # every image first: `train_labels` may draw from their RNG
            frames[part] = pd.DataFrame(rows, columns=["img_id", "img_path"])
            frames[part][list(classes)] = train_labels(labels) if part == "train" and train_labels else labels
        frames["train"].to_csv(tmp / "train.csv", index=False)
        test = frames["test"]
        test[["img_id", "img_path"]].to_csv(tmp / "test.csv", index=False)
        sample = test[["img_id"]].copy()
        sample[list(classes)] = 0
        sample.to_csv(tmp / "sample_submission.csv", index=False)
        test.drop(columns=["img_path"]).to_csv(tmp / "test_labels.csv", index=False)
        (tmp / stamp).write_text(json.dumps(settings))
        if out.exists():
            out.rmdir()  # empty (checked by reuse_existing)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


