"""The embedded demo data set: real handwritten digit scans, in the DACON layout, with no download.

Each image is a 2×2 mosaic with 1–4 digits from scikit-learn's `load_digits` scans in random
cells; its labels say which of the 10 digits appear. Train and test mosaics are drawn from
disjoint source scans, so the test score measures generalisation to unseen handwriting.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from aicoss_cli.errors import UserError

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
    if out.exists():
        stamp = out / STAMP
        if stamp.is_file() and json.loads(stamp.read_text()) == settings:
            return out
        if any(out.iterdir()):
            raise UserError(f"{out}: folder exists and is not this demo set; choose an empty or new folder")
    if size < 16 or size % 2:
        raise UserError(f"--size must be an even number ≥ 16 (got {size})")
    if n_train < 10 or n_test < 1:
        raise UserError(f"--n-train must be ≥ 10 and --n-test ≥ 1 (got {n_train}, {n_test})")
    if not 0.0 <= unannotated < 1.0:
        raise UserError(f"--unannotated must be in [0, 1) (got {unannotated})")

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_source_train = int(len(order) * 0.75)
    pools = {"train": order[:n_source_train], "test": order[n_source_train:]}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(out)
    try:
        tables = {}
        for split, count in (("train", n_train), ("test", n_test)):
            (tmp / split).mkdir()
            pool = pools[split]
            rows, labels = [], []
            for i in range(count):
                img, lab = _mosaic(rng, digits.images[pool], digits.target[pool], size)
                name = f"{split.upper()}_{i:05d}.jpg"
                img.save(tmp / split / name, quality=90)
                rows.append((f"{split.upper()}_{i:05d}", f"./{split}/{name}"))
                labels.append(lab)
                if on_progress:
                    on_progress(1)
            tables[split] = (rows, np.stack(labels))
        _write_tables(tmp, tables, rng, unannotated)
        (tmp / STAMP).write_text(json.dumps(settings))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _new_folder(out: Path) -> Path:
    """An empty new folder `.<name>.<random>` beside `out`, created with mode 0777 so the umask
    decides its permissions (mkdtemp's folders stay 0700 after the rename)."""
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{out.parent}: no free temporary name for {out.name}")


def _write_tables(root: Path, tables, rng: np.random.Generator, unannotated: float) -> None:
    import pandas as pd

    (train_rows, train_labels), (test_rows, test_labels) = tables["train"], tables["test"]
    if unannotated > 0:
        train_labels = train_labels.copy()
        train_labels[rng.random(train_labels.shape) < unannotated] = -1
    train = pd.DataFrame(train_rows, columns=["img_id", "img_path"])
    train[CLASSES] = train_labels
    train.to_csv(root / "train.csv", index=False)
    test = pd.DataFrame(test_rows, columns=["img_id", "img_path"])
    test.to_csv(root / "test.csv", index=False)
    sample = test[["img_id"]].copy()
    sample[CLASSES] = 0
    sample.to_csv(root / "sample_submission.csv", index=False)
    truth = test[["img_id"]].copy()
    truth[CLASSES] = test_labels
    truth.to_csv(root / "test_labels.csv", index=False)
