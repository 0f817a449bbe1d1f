"""The DACON data layout, its checks, the train/val split, the Dataset and its transforms.

    train.csv              img_id,img_path,<class 1>,...,<class K>   (0/1; -1 = not annotated)
    test.csv               img_id,img_path
    sample_submission.csv  img_id,<class 1>,...,<class K>

Class names and K come from the CSV header. Images are decoded with PIL and leave the Dataset as
uint8 tensors; normalisation happens on the device (`normalize`), which keeps loader work small.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from csv import reader as csv_rows
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from aicoss_cli.errors import UserError
from aicoss_cli.splits import split_record

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ID_COLUMNS = ("img_id", "img_path")
DATA_FILES = ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv")


# --------------------------------------------------------------------------- tables


@dataclass
class LabeledTable:
    """train.csv: ids, image paths (absolute), labels (N, K) int8 in {-1, 0, 1}, class names."""

    root: Path
    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_unannotated(self) -> bool:
        return bool((self.labels == -1).any())


@dataclass
class TestTable:
    """test.csv in the row order of sample_submission.csv (the order a submission must keep)."""

    root: Path
    ids: list[str]
    paths: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def data_inputs(root: str | Path) -> list[Path]:
    """The files of a data root that no output may replace."""
    return [Path(root) / name for name in DATA_FILES]


def _data_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root}: data folder not found; pass --data DIR or set [data] root "
            "(build a demo set with `aicoss demo-data DIR`)"
        )
    return root


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; the data root must hold train.csv, test.csv and sample_submission.csv")
    try:
        frame = pd.read_csv(path, dtype={"img_id": str, "img_path": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot be read as CSV ({reason})") from None
    _check_header(path)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _check_header(path: Path) -> None:
    """No column name twice in the header as written (pandas renames a repeat `x` to `x.1`, and
    the submission's header would then differ from sample_submission.csv's)."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = [name.strip() for name in next(csv_rows(f), [])]
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(header, start=1):
        seen.setdefault(name, []).append(i)
    repeated = {name: at for name, at in seen.items() if len(at) > 1}
    if repeated:
        name, at = next(iter(repeated.items()))
        times = "twice" if len(at) == 2 else f"{len(at)} times"
        raise UserError(f"{path}: column {name!r} appears {times} in the header (columns {', '.join(map(str, at))}); "
                        "each class needs one column of its own")


def _check_columns(frame: pd.DataFrame, path: Path, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(
            f"{path}: missing column {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(list(frame.columns)[:6])}{'...' if len(frame.columns) > 6 else ''}); "
            "the DACON layout needs img_id,img_path first"
        )


def _check_ids(frame: pd.DataFrame, path: Path) -> list[str]:
    if len(frame) == 0:
        raise UserError(f"{path}: no rows")
    ids = frame["img_id"]
    empty = ids.isna() | (ids.astype(str).str.strip() == "")
    if empty.any():
        raise UserError(f"{path}: row {int(np.flatnonzero(empty.to_numpy())[0]) + 2}: empty img_id")
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        first = ids.iloc[rows[0]]
        where = ", ".join(str(r + 2) for r in rows[:4])
        raise UserError(f"{path}: duplicate img_id {first!r} ({int(dup.sum())} rows share ids, e.g. rows {where}); ids must be unique")
    return ids.astype(str).tolist()


def _resolve_paths(frame: pd.DataFrame, root: Path, csv: Path) -> list[str]:
    """Absolute image paths, none of them outside the root, symbolic links followed. Cheap on
    65,000 rows (bench/data_paths.py): the root and each folder are resolved once, and each
    folder is listed once to know its links; a row costs a lookup, a link one realpath."""
    base = os.path.abspath(root)
    real_base = os.path.realpath(base)
    folders: dict[str, tuple[bool, set[str]]] = {}  # folder -> (resolves inside the root, its links)
    out = []
    for row, rel in enumerate(frame["img_path"].tolist()):
        if not isinstance(rel, str) or not rel.strip():
            raise UserError(f"{csv}: row {row + 2}: empty img_path")
        full = os.path.normpath(os.path.join(base, rel))
        if not full.startswith(base + os.sep):
            raise UserError(f"{csv}: row {row + 2}: img_path {rel!r} points outside the data root {root}")
        folder, name = os.path.split(full)
        entry = folders.get(folder)
        if entry is None:
            entry = folders[folder] = (_within(os.path.realpath(folder), real_base), _links_in(folder))
        folder_inside, links = entry
        if not folder_inside or name in links:  # only then can the file resolve elsewhere
            real = os.path.realpath(full)
            if not _within(real, real_base):
                raise UserError(f"{csv}: row {row + 2}: img_path {rel!r} is a symbolic link (or in a linked folder) "
                                f"that leads outside the data root {root}, to {real}; copy the image into the root, "
                                "or pass the folder that holds everything as --data")
        out.append(full)
    return out


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def _links_in(folder: str) -> set[str]:
    """Names of the symbolic links in a folder (none if it cannot be listed: missing images are
    reported by `check_images`)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_symlink()}
    except OSError:
        return set()


def read_train(root: str | Path) -> LabeledTable:
    """Read and check train.csv: columns, label values in {-1, 0, 1}, unique ids, safe paths."""
    root = _data_root(root)
    path = root / "train.csv"
    frame = _read_csv(path, "train.csv")
    _check_columns(frame, path, ID_COLUMNS)
    classes = [c for c in frame.columns if c not in ID_COLUMNS]
    if not classes:
        raise UserError(f"{path}: no class columns after img_id,img_path")
    ids = _check_ids(frame, path)
    labels = _parse_labels(frame[classes], path)
    paths = _resolve_paths(frame, root, path)
    return LabeledTable(root=root, ids=ids, paths=paths, labels=labels, classes=classes)


def _parse_labels(frame: pd.DataFrame, path: Path) -> np.ndarray:
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (-1.0, 0.0, 1.0))  # NaN (empty or text) is bad too
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raw = frame.iat[row, col]
        raise UserError(
            f"{path}: row {row + 2}, column {frame.columns[col]!r}: label {str(raw)!r} is not one of -1, 0, 1 "
            f"({int(bad.sum())} bad cells in all); use 1 = present, 0 = absent, -1 = not annotated"
        )
    return values.astype(np.int8)


def read_test(root: str | Path, classes: Sequence[str] | None = None) -> TestTable:
    """Read test.csv and sample_submission.csv; they must list the same ids, and the submission's
    class columns must be `classes` (when given) in the same order."""
    root = _data_root(root)
    test_path, sub_path = root / "test.csv", root / "sample_submission.csv"
    test = _read_csv(test_path, "test.csv")
    _check_columns(test, test_path, ID_COLUMNS)
    test_ids = _check_ids(test, test_path)
    sub = _read_csv(sub_path, "sample_submission.csv")
    _check_columns(sub, sub_path, ("img_id",))
    sub_ids = _check_ids(sub, sub_path)
    sub_classes = [c for c in sub.columns if c != "img_id"]
    if classes is not None and list(classes) != sub_classes:
        missing = [c for c in classes if c not in sub_classes]
        extra = [c for c in sub_classes if c not in classes]
        if missing or extra:
            detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
            raise UserError(f"{sub_path}: class columns do not match the model's classes ({detail})")
        raise UserError(f"{sub_path}: class columns are in another order than the model's classes")
    if set(test_ids) != set(sub_ids):
        only_test = [i for i in test_ids if i not in set(sub_ids)]
        only_sub = [i for i in sub_ids if i not in set(test_ids)]
        example = f"{only_test[0]!r} is only in test.csv" if only_test else f"{only_sub[0]!r} is only in sample_submission.csv"
        raise UserError(
            f"{test_path}: does not match sample_submission.csv ({len(only_test)} ids only in test.csv, "
            f"{len(only_sub)} only in the submission; {example})"
        )
    paths = _resolve_paths(test, root, test_path)
    by_id = dict(zip(test_ids, paths))
    return TestTable(root=root, ids=sub_ids, paths=[by_id[i] for i in sub_ids], classes=sub_classes)


# --------------------------------------------------------------------------- image checks


def refuse_decompression_bombs() -> None:
    """Make PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, 89 Mpx: a 9459×9459 image) an error:
    above it PIL only warns, and a 17 KB PNG can then decode to gigabytes. Call before opening
    images (cheap; per process, as loader processes may not inherit the filter)."""
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def too_many_pixels(exc: BaseException) -> str | None:
    """What to say when `exc` is PIL refusing an image above its pixel limit (else None)."""
    if not isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return None
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{found.group(1)} pixels" if found else "too many pixels"
    return (f"too large ({pixels}; the limit is {Image.MAX_IMAGE_PIXELS}, PIL's MAX_IMAGE_PIXELS): "
            "downscale it")


def _image_problem(path: str) -> str | None:
    """Why an image cannot be used, or None. Cheap: header parse and end-of-file marker, no decode."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            fmt = img.format
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            tail = f.read()
    except Exception as exc:  # PIL raises several types for unreadable files
        if too_many_pixels(exc):
            return too_many_pixels(exc)
        reason = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).replace(f" {path!r}", "")
        truncated = reason.lower().startswith("truncated") or "is truncated" in reason.lower()
        return f"truncated file ({reason})" if truncated else f"unreadable ({reason})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def check_images(paths: Sequence[str], csv: Path, on_progress: Callable[[int], None] | None = None) -> None:
    """Every image must exist and look complete; report how many fail and the first few."""
    problems: list[tuple[str, str]] = []
    refuse_decompression_bombs()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for path, problem in zip(paths, pool.map(_image_problem, paths, chunksize=256)):
            if problem:
                problems.append((path, problem))
            if on_progress:
                on_progress(1)
    if not problems:
        return
    missing = [p for p, why in problems if why == "missing"]
    if missing:
        names = ", ".join(_short(p, csv) for p in missing[:3])
        raise UserError(
            f"{csv}: {len(missing)} of {len(paths)} images are missing (first: {names}); check img_path and the data root"
        )
    path, why = problems[0]
    raise UserError(
        f"{csv}: {len(problems)} of {len(paths)} images cannot be used (first: {_short(path, csv)}: {why}); "
        "replace or remove those rows"
    )


def _short(path: str, csv: Path) -> str:
    try:
        return str(Path(path).relative_to(os.path.abspath(csv.parent)))
    except ValueError:
        return path


# --------------------------------------------------------------------------- images and transforms


def load_image(path: str, size: int | None = None) -> Image.Image:
    """Decode an image to RGB with PIL, resized to size×size (bilinear, antialiased) when given."""
    refuse_decompression_bombs()
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))  # decode at a reduced scale when that is still ≥ size
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return img


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor, sharing nothing with the PIL image."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class Cutout(torch.nn.Module):
    """Cut a square of side `factor`·H × `factor`·W at a random centre (clipped at the borders)
    and fill it with one random colour, as the seed's CutoutPIL does."""

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.factor <= 0:
            return img
        _, h, w = img.shape
        ch, cw = int(h * self.factor + 0.5), int(w * self.factor + 0.5)
        y = int(torch.randint(0, h, ()))
        x = int(torch.randint(0, w, ()))
        y0, y1 = max(0, y - ch // 2), min(h, y + ch // 2)
        x0, x1 = max(0, x - cw // 2), min(w, x + cw // 2)
        colour = torch.randint(0, 256, (3, 1, 1), dtype=torch.uint8)
        out = img.clone()
        out[:, y0:y1, x0:x1] = colour
        return out


def build_train_transform(policy: str, magnitude: int = 9, num_ops: int = 2, cutout_factor: float = 0.5):
    """Augmentation on a resized uint8 (3, H, W) tensor; None for policy "none"."""
    from torchvision.transforms import v2

    if policy == "none":
        return None
    if policy == "weak":
        return v2.Compose([Cutout(cutout_factor), v2.RandAugment(num_ops=num_ops, magnitude=magnitude)])
    if policy == "strong":
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                Cutout(cutout_factor),
                v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
            ]
        )
    raise UserError(f"[augment] policy must be weak, strong or none (got {policy!r})")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: independent of workers, ranks and resumes."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


class ImageDataset(torch.utils.data.Dataset):
    """Items are (uint8 image (3, S, S), labels (K,) float32, row index, error text).

    A key is a row index (no augmentation) or (row index, sample seed) (augmented under that
    seed). A file that fails to decode yields a zero image and the error text instead of raising,
    so the training loop can stop cleanly with the file's name.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray | None, img_size: int, transform=None):
        self.paths = list(paths)
        self.labels = None if labels is None else torch.from_numpy(labels.astype(np.float32))
        self.img_size = img_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        target = self.labels[index] if self.labels is not None else torch.zeros(0)
        try:
            image = pil_to_uint8(load_image(self.paths[index], self.img_size))
        except Exception as exc:  # any decode failure becomes a reported error, never a crash in a worker
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
            return blank, target, index, f"{self.paths[index]}: cannot decode image ({type(exc).__name__}: {exc})"
        if self.transform is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, target, index, ""

    def __getitems__(self, keys: list) -> list:
        """A batch of items (the DataLoader's batched fetch), made with one intra-op thread: on
        tensors this small torch's thread pool costs far more than it gains — RandAugment ran 10×
        slower with 2 threads than with 1 on 2 cores (bench/train_overhead.py) — and with
        `num_workers = 0` that pool is the model's."""
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return [self[key] for key in keys]
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, (x/255 − mean)/std, computed where the tensor lives (the device).

    Every model takes ImageNet-normalised input; a backbone trained on other statistics
    re-normalises inside the model, so data code never depends on the arch."""
    scale = torch.tensor(std, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return (images.to(dtype) - shift) / scale


# --------------------------------------------------------------------------- everything a run trains on


@dataclass
class PreparedData:
    table: LabeledTable
    test: TestTable
    train_rows: np.ndarray
    val_rows: np.ndarray
    split: dict[str, Any]


def prepare_data(recipe, progress=None) -> PreparedData:
    """Read and check every input before any compute: CSVs, labels, split, every image file."""
    table = read_train(recipe.data.root)
    test = read_test(recipe.data.root, table.classes)
    if len(test) == 0:
        raise UserError(f"{test.root / 'test.csv'}: no test images")
    for paths, csv in ((table.paths, table.root / "train.csv"), (test.paths, test.root / "test.csv")):
        task = progress.add_task(f"checking {csv.name} images", total=len(paths)) if progress else None
        check_images(paths, csv, (lambda n, t=task: progress.advance(t, n)) if progress else None)
        if progress:
            progress.remove_task(task)
    train_rows, val_rows, split = split_record(table, recipe.data.split, recipe.data.val_fraction,
                                               recipe.data.split_seed)
    if not (table.labels[val_rows] > 0).any():
        raise UserError(
            f"{table.root / 'train.csv'}: the val split ({len(val_rows)} images) has no positive label for any class, "
            "so val mAP is undefined and no checkpoint could be judged; raise [data] val_fraction, try another "
            "split_seed, or use split = \"stratified\"")
    if len(train_rows) < recipe.optim.batch_size:
        raise UserError(f"[optim] batch_size {recipe.optim.batch_size} is larger than the training split "
                        f"({len(train_rows)} images); lower it with --set optim.batch_size=N")
    return PreparedData(table, test, train_rows, val_rows, split)
