"""The train/val splits: the seed's random split and the stratified one."""

from __future__ import annotations

import numpy as np

from aicoss_cli.data.splits import class_ratio_gap, split_indices
from aicoss_cli.data.tables import read_train


def test_random_split_reproduces_sklearn_train_test_split(demo_root):
    from sklearn.model_selection import train_test_split

    labels = read_train(demo_root).labels
    train, val = split_indices(labels, "random", 0.1, 78)
    ref_train, ref_val = train_test_split(np.arange(len(labels)), test_size=0.1, random_state=78)
    assert np.array_equal(val, np.sort(ref_val)) and np.array_equal(train, np.sort(ref_train))
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)


def test_stratified_split_balances_class_ratios_better_than_random(demo_root):
    labels = read_train(demo_root).labels
    gaps = {}
    for kind in ("random", "stratified"):
        per_seed = [class_ratio_gap(labels, *split_indices(labels, kind, 0.2, s)).mean() for s in range(5)]
        gaps[kind] = float(np.mean(per_seed))
    assert gaps["stratified"] < gaps["random"] / 2, gaps
