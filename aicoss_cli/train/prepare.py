"""Everything a run trains on, read and checked before any compute: the CSVs, the labels, every
image file, the split, that the split can be trained and judged, and that the recipe fits it (the
batch size, the arch's input size, a prior file's classes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.images import check_images
from aicoss_cli.data.splits import fold_assignment, fold_record, split_record
from aicoss_cli.data.tables import LabeledTable, TestTable, read_test, read_train
from aicoss_cli.models.registry import input_size_problem
from aicoss_cli.train.prior import read_prior_csv


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
    d = recipe.data
    if d.folds is not None:  # fold k of K-fold cross-validation (fold 0 when the recipe names none)
        train_rows, val_rows, split = fold_record(table, d.folds, d.fold or 0, d.split_seed)
        check_every_fold(table, recipe)
    else:
        train_rows, val_rows, split = split_record(table, d.split, d.val_fraction, d.split_seed)
    if not (table.labels[val_rows] > 0).any():
        raise UserError(
            f"{table.root / 'train.csv'}: the val split ({len(val_rows)} images) has no positive label for any class, "
            "so val mAP is undefined and no checkpoint could be judged; raise [data] val_fraction, try another "
            "split_seed, or use split = \"stratified\"")
    check_fits(recipe, len(train_rows), table.classes)
    return PreparedData(table, test, train_rows, val_rows, split)


def check_fits(recipe, n_train: int, classes: list[str]) -> None:
    """What the recipe asks of this data and of its arch: a batch no larger than the training split,
    an input size the arch takes, a prior file listing these classes (read as training reads it)."""
    if n_train < recipe.optim.batch_size:
        raise UserError(f"[optim] batch_size {recipe.optim.batch_size} is larger than the training split "
                        f"({n_train} images); lower it with --set optim.batch_size=N")
    size, arch = recipe.model.img_size, recipe.model.arch
    problem = input_size_problem(arch, size) if size is not None else None
    if problem:
        raise UserError(f"[model] img_size {size}: {arch} cannot take {size}×{size} images ({problem}); choose "
                        "another size, e.g. a multiple of 32")
    if recipe.loss.prior not in (False, "labels", "predictions"):
        read_prior_csv(recipe.loss.prior, classes)


def check_every_fold(table: LabeledTable, recipe) -> None:
    """Each fold of a K-fold recipe trains on at least one batch and validates on a positive label:
    checked for all K before the first fold trains, so a cross-validation never stops half-way."""
    d = recipe.data
    fold_of = fold_assignment(table.labels, d.folds, d.split_seed)
    for k in range(d.folds):
        val, n_train = fold_of == k, int((fold_of != k).sum())
        if not (table.labels[val] > 0).any():
            raise UserError(f"{table.root / 'train.csv'}: fold {k} of {d.folds} ({int(val.sum())} images) has no "
                            "positive label, so its val mAP is undefined; use fewer folds")
        if n_train < recipe.optim.batch_size:
            raise UserError(f"[optim] batch_size {recipe.optim.batch_size} is larger than the training folds of fold "
                            f"{k} ({n_train} images); lower it with --set optim.batch_size=N")
