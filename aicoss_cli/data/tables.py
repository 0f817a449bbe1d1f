"""The DACON data layout and its checks: train.csv, test.csv and sample_submission.csv read into
tables, every byte of them treated as untrusted.

    train.csv              img_id,img_path,<class 1>,...,<class K>   (0/1; -1 = not annotated)
    test.csv               img_id,img_path
    sample_submission.csv  img_id,<class 1>,...,<class K>

Class names and K come from the CSV header, never from code, kept exactly as written (spaces
included: the submission's header must be sample_submission.csv's); image paths are resolved inside
the data root (a path or a symbolic link that leads outside it is refused).
"""

from __future__ import annotations

import os
from csv import reader as csv_rows
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from aicoss_cli.base.errors import UserError

ID_COLUMNS = ("img_id", "img_path")
DATA_FILES = ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv")


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
    frame.columns = [id_column(str(c)) for c in frame.columns]
    return frame


def id_column(name: str) -> str:
    """`img_id` / `img_path` also with spaces around them; any other name (a class) as written."""
    return name.strip() if name.strip() in ID_COLUMNS else name


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
        what = "is empty" if pd.isna(raw) else f"{str(raw)!r} is not one of -1, 0, 1"
        raise UserError(
            f"{path}: row {row + 2}, column {frame.columns[col]!r}: label {what} "
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


def image_paths(root: str | Path) -> dict[str, str]:
    """img_id -> absolute image path, from each CSV of the data root that has an img_path column
    (train.csv, test.csv, test_labels.csv; the first one naming an id wins), resolved and checked
    as `read_train` resolves them."""
    root = _data_root(root)
    found: dict[str, str] = {}
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        path = root / name
        if not path.is_file():
            continue
        frame = _read_csv(path, name)
        if not set(ID_COLUMNS) <= set(frame.columns):
            continue
        for img_id, full in zip(_check_ids(frame, path), _resolve_paths(frame, root, path)):
            found.setdefault(img_id, full)
    return found


def read_image_list(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, absolute paths) of an img_id,img_path CSV of images without labels (as test.csv is laid
    out); img_path values are relative to the CSV's folder and must stay inside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image list not found; give a CSV with the columns img_id,img_path")
    frame = _read_csv(path, "image list")
    _check_columns(frame, path, ID_COLUMNS)
    return _check_ids(frame, path), _resolve_paths(frame, path.parent, path)


# --------------------------------------------------------------------------- image checks


# --------------------------------------------------------------------------- images and transforms


# --------------------------------------------------------------------------- everything a run trains on
