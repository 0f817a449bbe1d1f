"""A second small data set, from real photographs that ship inside installed packages: crops of
scenery, flowers and a portrait in 2×2 mosaics, labelled by what they show, in the DACON layout.

The photos: scikit-learn's `china.jpg` (a pagoda over a lake, trees, sky) and `flower.jpg` (a dahlia
before leaves), matplotlib's `grace_hopper.jpg` (a portrait before a flag). Each of the 11 classes
is a few hand-drawn boxes on one photo (pagoda, sky, lake, trees, petals, leaves, flag, cap, face,
uniform, backdrop). A mosaic fills 1–4 random cells with a square crop of a random class (random
position, zoom, flip, quarter turn, brightness, contrast and colour, sometimes grey, sensor
noise), and half of the other cells with clutter from unlabelled regions (a horizon, a shirt,
ribbons); the labels say which classes appear. Every box is cut in two along its longer side:
train crops come from the first 70 %, test crops from the rest, so test mosaics show pixels no
training image holds. Like the demo, it writes `test_labels.csv` for `aicoss score`; the same
seed gives byte-identical files, and an existing folder is never overwritten. Sky, lake and backdrop, trees and leaves, or cap and uniform look
alike in a 24-pixel cell.

    python bench/photo_data.py data/photos --n-train 1500 --n-test 500   # the measurement of docs/recipes.md
    python bench/photo_data.py data/photos_full                          # 3000 train + 1000 test, 64 px
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aicoss_cli.base.errors import UserError

# class -> (photo, boxes (x0, y0, x1, y1) in the photo's pixels)
CLASSES: dict[str, tuple[str, list[tuple[int, int, int, int]]]] = {
    "pagoda": ("china", [(100, 100, 300, 330)]),
    "sky": ("china", [(340, 5, 630, 180)]),
    "lake": ("china", [(340, 235, 520, 300)]),
    "trees": ("china", [(549, 140, 640, 420), (0, 300, 69, 420), (377, 335, 549, 427)]),
    "petals": ("flower", [(219, 133, 399, 313)]),
    "leaves": ("flower", [(0, 0, 170, 427), (470, 0, 640, 300)]),
    "flag": ("hopper", [(0, 0, 120, 480)]),
    "cap": ("hopper", [(160, 30, 370, 160)]),
    "face": ("hopper", [(185, 170, 350, 330)]),
    "uniform": ("hopper", [(40, 420, 200, 600)]),
    "backdrop": ("hopper", [(380, 0, 512, 330)]),
}
# unlabelled regions (a horizon, a shirt, medal ribbons): crops of them fill some empty cells, as
# clutter a model must not mistake for a class
CLUTTER: list[tuple[str, tuple[int, int, int, int]]] = [
    ("china", (330, 185, 549, 232)), ("hopper", (255, 335, 330, 470)), ("hopper", (395, 480, 500, 530))]
TRAIN_PART = 0.7
STAMP = "photo_data.json"


def photo_paths() -> dict[str, Path]:
    import matplotlib
    import sklearn.datasets

    sk = Path(sklearn.datasets.__file__).parent / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return {"china": sk / "china.jpg", "flower": sk / "flower.jpg", "hopper": mpl / "grace_hopper.jpg"}


def split_box(box: tuple[int, int, int, int], part: str) -> tuple[int, int, int, int]:
    """The train (first 70 %) or test (the rest) part of a box, cut along its longer side."""
    x0, y0, x1, y1 = box
    if x1 - x0 >= y1 - y0:
        cut = x0 + round((x1 - x0) * TRAIN_PART)
        return (x0, y0, cut, y1) if part == "train" else (cut, y0, x1, y1)
    cut = y0 + round((y1 - y0) * TRAIN_PART)
    return (x0, y0, x1, cut) if part == "train" else (x0, cut, x1, y1)


def _crop(rng: np.random.Generator, photo: Image.Image, box: tuple[int, int, int, int], cell: int) -> np.ndarray:
    """A random square crop inside `box` (side 20–60 % of the box's shorter side) resized to the
    cell, flipped and turned by a random multiple of 90°, with brightness, contrast and colour
    ×0.6–1.4, grey in one case of six."""
    x0, y0, x1, y1 = box
    short = min(x1 - x0, y1 - y0)
    side = int(rng.integers(max(8, int(short * 0.2)), max(9, int(short * 0.6)) + 1))
    x = int(rng.integers(x0, x1 - side + 1))
    y = int(rng.integers(y0, y1 - side + 1))
    patch = photo.crop((x, y, x + side, y + side)).resize((cell, cell), Image.BILINEAR)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    patch = patch.rotate(90 * int(rng.integers(4)))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        patch = enhance(patch).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 1 / 6:
        patch = patch.convert("L").convert("RGB")
    return np.asarray(patch, dtype=np.float32)


def _mosaic(rng: np.random.Generator, photos: dict[str, Image.Image], part: str, size: int):
    """1–4 cells hold a crop of a class; each other cell is black or, half the time, clutter."""
    cell = size // 2
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    labels = np.zeros(len(CLASSES), dtype=np.int8)
    names = list(CLASSES)
    filled = set(int(c) for c in rng.choice(4, size=int(rng.integers(1, 5)), replace=False))
    for c in range(4):
        y, x = divmod(c, 2)
        if c in filled:
            k = int(rng.integers(len(names)))
            photo, boxes = CLASSES[names[k]]
            box = split_box(boxes[int(rng.integers(len(boxes)))], part)
            labels[k] = 1
        elif rng.random() < 0.5:
            photo, whole = CLUTTER[int(rng.integers(len(CLUTTER)))]
            box = split_box(whole, part)
        else:
            continue
        canvas[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = _crop(rng, photos[photo], box, cell)
    canvas += rng.normal(0.0, 6.0, canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), labels


def build_photo_data(out: str | Path, n_train: int = 3000, n_test: int = 1000, size: int = 64, seed: int = 0) -> Path:
    """Write the set to `out` (a new folder renamed at the end, as `aicoss demo-data` writes its
    set); reuse one built with the same settings."""
    from aicoss_cli.data.demo import reuse_existing, write_image_set

    out = Path(out)
    settings = {"n_train": n_train, "n_test": n_test, "size": size, "seed": seed}
    if reuse_existing(out, STAMP, settings, "this data set"):
        return out
    if size < 16 or size % 2:
        raise UserError(f"--size must be an even number >= 16 (got {size})")
    photos = {k: Image.open(p).convert("RGB") for k, p in photo_paths().items()}
    rng = np.random.default_rng(seed)
    return write_image_set(out, list(CLASSES), {"train": n_train, "test": n_test},
                           lambda part: _mosaic(rng, photos, part, size), STAMP, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        path = build_photo_data(args.out, args.n_train, args.n_test, args.size, args.seed)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"photo data in {path}: {args.n_train} train + {args.n_test} test images of {args.size}x{args.size}, "
          f"{len(CLASSES)} classes ({', '.join(CLASSES)})")


if __name__ == "__main__":
    main()
