"""K folds of train.csv: disjoint, covering every row, stratified per class, seeded, -1 counted as
absent; the record a fold's checkpoint keeps, rebuilt and verified; K checked against the data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aicoss_cli.base.errors import UserError


def table_of(root):
    from aicoss_cli.data.tables import read_train

    return read_train(root)


def test_the_folds_are_disjoint_cover_every_row_and_train_on_the_rest(demo_root):
    from aicoss_cli.data.splits import fold_record

    table = table_of(demo_root)
    vals = []
    for k in range(3):
        train, val, record = fold_record(table, 3, k, 78)
        assert set(train).isdisjoint(val) and len(train) + len(val) == len(table)
        assert record["kind"] == "kfold" and (record["folds"], record["fold"], record["split_seed"]) == (3, k, 78)
        assert record["n_val"] == len(val)
        vals.append(set(int(i) for i in val))
    assert all(a.isdisjoint(b) for i, a in enumerate(vals) for b in vals[i + 1:])
    assert set().union(*vals) == set(range(len(table)))
    assert sorted(len(v) for v in vals)[-1] - sorted(len(v) for v in vals)[0] <= 0.1 * len(table)


def test_the_folds_are_stratified_per_class(demo_root):
    """Each class's positives spread over the 3 folds within one image of P/3 (a random assignment of
    the same sizes misses by several)."""
    from aicoss_cli.data.splits import fold_assignment

    table = table_of(demo_root)
    positive = table.labels > 0
    fold_of = fold_assignment(table.labels, 3, 78)
    per_fold = np.stack([positive[fold_of == k].sum(axis=0) for k in range(3)])
    assert np.abs(per_fold - positive.sum(axis=0) / 3).max() < 1.0
    shuffled = np.random.default_rng(0).permutation(fold_of)
    per_fold_random = np.stack([positive[shuffled == k].sum(axis=0) for k in range(3)])
    assert np.abs(per_fold_random - positive.sum(axis=0) / 3).max() > 2.0


def test_the_folds_follow_the_split_seed_and_count_unannotated_as_absent(demo_root_partial):
    from aicoss_cli.data.splits import fold_assignment

    labels = table_of(demo_root_partial).labels
    assert (labels == -1).any()
    a = fold_assignment(labels, 4, 78)
    assert np.array_equal(a, fold_assignment(labels, 4, 78))
    assert not np.array_equal(a, fold_assignment(labels, 4, 79))
    assert np.array_equal(a, fold_assignment(np.where(labels < 0, 0, labels), 4, 78))
    assert not np.array_equal(a, fold_assignment(np.where(labels < 0, 1, labels), 4, 78))


def test_a_fold_record_is_rebuilt_and_verified_from_a_checkpoint(demo_root, tmp_path):
    from aicoss_cli.data.splits import fold_record, split_from_record, training_rows
    from aicoss_cli.models.checkpoint import CheckpointMeta

    table = table_of(demo_root)
    train, val, record = fold_record(table, 3, 1, 78)
    meta = CheckpointMeta.from_strings(
        CheckpointMeta(arch="tiny_convnet", img_size=32, classes=table.classes, split=record).to_strings(), "x")
    assert meta.split == record
    rebuilt_train, rebuilt_val = split_from_record(meta.split, table, "x")
    assert np.array_equal(rebuilt_train, train) and np.array_equal(rebuilt_val, val)
    assert np.array_equal(training_rows(meta.split, table, "x"), train)
    with pytest.raises(UserError, match="selects other images"):
        split_from_record({**record, "split_seed": 79}, table, "x.safetensors")


@pytest.mark.parametrize("change, expected", [
    ({"fold": 3}, "its fold must be an integer in [0, folds)"),
    ({"folds": 1}, "its folds must be an integer ≥ 2"),
    ({"kind": "folds"}, 'its kind must be "random", "stratified" or "kfold"'),
])
def test_a_damaged_fold_record_in_a_checkpoint_is_refused(demo_root, change, expected):
    from aicoss_cli.data.splits import fold_record
    from aicoss_cli.models.checkpoint import CheckpointMeta

    table = table_of(demo_root)
    record = fold_record(table, 3, 1, 78)[2]
    strings = CheckpointMeta(arch="tiny_convnet", img_size=32, classes=table.classes, split=record).to_strings()
    strings["split"] = json.dumps({**record, **change})
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        CheckpointMeta.from_strings(strings, "x.safetensors")


def test_k_is_checked_against_the_rarest_labelled_class():
    from aicoss_cli.data.splits import check_folds

    labels = np.zeros((20, 3), dtype=np.int8)
    labels[:10, 0] = 1
    labels[:3, 1] = 1  # the rarest labelled class: 3 positives
    labels[5:8, 2] = -1  # class 2: none, so it constrains nothing
    check_folds(labels, ["a", "b", "c"], 3, "train.csv")
    with pytest.raises(UserError, match=r"class 'b' has only 3 positive images.*at most 3 folds \(--folds 3\)"):
        check_folds(labels, ["a", "b", "c"], 4, "train.csv")
    with pytest.raises(UserError, match="at least 2 folds"):
        check_folds(labels, ["a", "b", "c"], 1, "train.csv")
    labels[1:3, 1] = 0
    with pytest.raises(UserError, match=r"class 'b' has only 1 positive image,.*leave the class out"):
        check_folds(labels, ["a", "b", "c"], 2, "train.csv")
