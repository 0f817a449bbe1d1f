"""The train/val split: the seed's seeded random split or a multi-label stratified one, the seed's
split-seed search, and the record of a split a checkpoint keeps (and its verification).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from aicoss_cli.base.errors import UserError

# The seed's split: scikit-learn's train_test_split(df, test_size=0.1, random_state=78).
SEED_SPLIT = {"kind": "random", "val_fraction": 0.1, "split_seed": 78}


def split_indices(labels: np.ndarray, kind: str, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and val row indices (sorted). `random` reproduces the seed's
    `train_test_split(df, test_size=val_fraction, random_state=seed)`; `stratified` is multi-label
    iterative stratification (-1 counts as absent)."""
    n = len(labels)
    n_val = int(np.ceil(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise UserError(f"[data] val_fraction {val_fraction} leaves an empty train or val split of {n} images")
    if kind == "random":
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(np.arange(n), test_size=val_fraction, random_state=seed)
    elif kind == "stratified":
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
        train, val = next(splitter.split(np.zeros(n), (labels > 0).astype(int)))
    else:
        raise UserError(f"[data] split must be 'random' or 'stratified' (got {kind!r})")
    return np.sort(train), np.sort(val)


def class_ratio_gap(labels: np.ndarray, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """|positive rate in train − positive rate in val| per class."""
    pos = labels > 0
    return np.abs(pos[train].mean(axis=0) - pos[val].mean(axis=0))


def split_search(labels: np.ndarray, val_fraction: float, states: Sequence[int], kind: str = "random") -> list[dict]:
    """The seed's split-seed search: the class-ratio gap of each random state, most balanced first."""
    rows = []
    for state in states:
        train, val = split_indices(labels, kind, val_fraction, state)
        gap = class_ratio_gap(labels, train, val)
        rows.append({"split_seed": int(state), "mean": float(gap.mean()), "std": float(gap.std())})
    return sorted(rows, key=lambda r: (r["mean"], r["std"]))


SPLIT_KEYS = ("kind", "val_fraction", "split_seed", "val_fingerprint")


def split_record(table, kind: str, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and val rows of a split, and the record of it a checkpoint keeps (`split` metadata)."""
    train, val = split_indices(table.labels, kind, val_fraction, seed)
    record = {"kind": kind, "val_fraction": val_fraction, "split_seed": seed, "n_rows": len(table),
              "n_val": int(len(val)), "val_fingerprint": split_fingerprint(table.ids, val)}
    return train, val, record


def split_from_record(record: dict | None, table, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The train and val rows a checkpoint was trained and validated on, rebuilt from its `split`
    metadata and verified against `table` (same rows, and the val ids hash to its fingerprint)."""
    split = record or {}
    csv = table.root / "train.csv"
    if not all(k in split for k in SPLIT_KEYS):
        raise UserError(f"{source}: no validation split in its metadata (not written by `aicoss train`?); "
                        "its val scores cannot be rebuilt")
    if split.get("n_rows") is not None and int(split["n_rows"]) != len(table):
        raise UserError(f"{source}: validated on a train.csv of {split['n_rows']} rows but {csv} has {len(table)}; "
                        "pass the --data it was trained on")
    train, val = split_indices(table.labels, split["kind"], float(split["val_fraction"]), int(split["split_seed"]))
    found = split_fingerprint(table.ids, val)
    if found != split["val_fingerprint"]:
        raise UserError(f"{source}: its val split ({describe_split(split)}) selects other images in {csv} "
                        f"(fingerprint {found}); pass the --data it was trained on")
    return train, val


def describe_split(split: dict | None) -> str:
    if not split:
        return "no split recorded"
    return (f"{split.get('kind')} split, val_fraction {split.get('val_fraction')}, split_seed "
            f"{split.get('split_seed')}, fingerprint {split.get('val_fingerprint')}")


def split_fingerprint(ids: Sequence[str], val: np.ndarray) -> str:
    """A short hash of the val ids: two checkpoints with the same one were validated on the same images."""
    digest = hashlib.sha1("\n".join(sorted(ids[i] for i in val)).encode()).hexdigest()
    return digest[:16]


def training_rows(record: dict | None, table, source: str) -> np.ndarray:
    """The rows a checkpoint trained on: its recorded split, verified when it has a fingerprint
    (an imported seed checkpoint without --data records only the seed's split settings; none at
    all means the seed's split)."""
    split = {**SEED_SPLIT, **(record or {})}
    if split.get("val_fingerprint"):
        return split_from_record(split, table, source)[0]
    train, _ = split_indices(table.labels, split["kind"], float(split["val_fraction"]), int(split["split_seed"]))
    return train
