"""The train/val split: the seed's seeded random split, a multi-label stratified one, or fold k of a
K-fold cross-validation; the seed's split-seed search; and the record of a split a checkpoint keeps
(and its verification).
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
FOLD_KEYS = ("kind", "folds", "fold", "split_seed", "val_fingerprint")
FOLD_KIND = "kfold"  # the `kind` of a fold's split record


def split_record(table, kind: str, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and val rows of a split, and the record of it a checkpoint keeps (`split` metadata)."""
    train, val = split_indices(table.labels, kind, val_fraction, seed)
    record = {"kind": kind, "val_fraction": val_fraction, "split_seed": seed, "n_rows": len(table),
              "n_val": int(len(val)), "val_fingerprint": split_fingerprint(table.ids, val)}
    return train, val, record


# --------------------------------------------------------------------------- K-fold cross-validation


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..K-1) of every row: iterstrat's MultilabelStratifiedKFold (multi-label iterative
    stratification, Sechidis et al. 2011) with shuffling seeded by `seed`; -1 counts as absent."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), (labels > 0).astype(int))):
        fold_of[val] = k
    return fold_of


def check_folds(labels: np.ndarray, classes: Sequence[str], folds: int, csv) -> None:
    """K-fold needs K >= 2, at most as many folds as images, and every labelled class (one with a
    positive) in at least K images, so that each fold validates on it."""
    if folds < 2:
        raise UserError(f"[data] folds = {folds}: K-fold cross-validation needs at least 2 folds")
    if folds > len(labels):
        raise UserError(f"{csv}: [data] folds = {folds} is more than its {len(labels)} images; use fewer folds")
    positives = (labels > 0).sum(axis=0)
    labelled = np.flatnonzero(positives > 0)
    if not len(labelled):
        raise UserError(f"{csv}: no class has a positive label, so no fold could be judged")
    rarest = int(labelled[np.argmin(positives[labelled])])
    count = int(positives[rarest])
    if count < folds:
        fix = f"use at most {count} folds (--folds {count})" if count >= 2 else \
            "K-fold needs 2 or more; leave the class out, or train on a single split (no --folds)"
        raise UserError(f"{csv}: [data] folds = {folds}, but class {classes[rarest]!r} has only {count} positive "
                        f"image{'s' if count != 1 else ''}, so some fold would validate without it; {fix}")


def fold_rows(fold_of: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Train rows (every other fold) and val rows (fold k) of a fold assignment."""
    return np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)


def fold_record(table, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train rows (the other K-1 folds), val rows (fold k) and the split record a fold's checkpoint
    keeps: folds, fold, split_seed, the fingerprint of its val ids and that of the whole assignment."""
    check_folds(table.labels, table.classes, folds, table.root / "train.csv")
    if not 0 <= fold < folds:
        raise UserError(f"[data] fold = {fold}: a {folds}-fold cross-validation has folds 0 to {folds - 1}")
    fold_of = fold_assignment(table.labels, folds, seed)
    train, val = fold_rows(fold_of, fold)
    record = {"kind": FOLD_KIND, "folds": folds, "fold": fold, "split_seed": seed, "n_rows": len(table),
              "n_val": int(len(val)), "val_fingerprint": split_fingerprint(table.ids, val),
              "folds_fingerprint": folds_fingerprint(table.ids, fold_of)}
    return train, val, record


def folds_fingerprint(ids: Sequence[str], fold_of: np.ndarray) -> str:
    """A short hash of the whole fold assignment (each id with its fold): the K checkpoints of one
    cross-validation share it."""
    pairs = sorted(f"{i}\t{int(k)}" for i, k in zip(ids, fold_of))
    return hashlib.sha1("\n".join(pairs).encode()).hexdigest()[:16]


def split_from_record(record: dict | None, table, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The train and val rows a checkpoint was trained and validated on, rebuilt from its `split`
    metadata and verified against `table` (same rows, and the val ids hash to its fingerprint)."""
    split = record or {}
    csv = table.root / "train.csv"
    fold = split.get("kind") == FOLD_KIND
    if not all(k in split for k in (FOLD_KEYS if fold else SPLIT_KEYS)):
        raise UserError(f"{source}: no validation split in its metadata (not written by `aicoss train`?); "
                        "its val scores cannot be rebuilt")
    if split.get("n_rows") is not None and int(split["n_rows"]) != len(table):
        raise UserError(f"{source}: validated on a train.csv of {split['n_rows']} rows but {csv} has {len(table)}; "
                        "pass the --data it was trained on")
    if fold:
        fold_of = fold_assignment(table.labels, int(split["folds"]), int(split["split_seed"]))
        train, val = fold_rows(fold_of, int(split["fold"]))
    else:
        train, val = split_indices(table.labels, split["kind"], float(split["val_fraction"]), int(split["split_seed"]))
    found = split_fingerprint(table.ids, val)
    if found != split["val_fingerprint"]:
        raise UserError(f"{source}: its val split ({describe_split(split)}) selects other images in {csv} "
                        f"(fingerprint {found}); pass the --data it was trained on")
    return train, val


def describe_split(split: dict | None) -> str:
    if not split:
        return "no split recorded"
    if split.get("kind") == FOLD_KIND:
        return (f"fold {split.get('fold')} of {split.get('folds')}, split_seed {split.get('split_seed')}, "
                f"fingerprint {split.get('val_fingerprint')}")
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
