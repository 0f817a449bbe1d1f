"""mAP: macro average precision over the classes that have a positive."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from aicoss_cli.evaluation.metrics import average_precision_per_class, mean_average_precision, skipped_classes


def test_hand_computed_average_precision():
    # ranked by score: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    targets = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    assert average_precision_per_class(targets, scores)[0] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((200, 12)) < 0.3).astype(int)
    scores = np.round(rng.random((200, 12)), 1)  # many ties: AP must group them as sklearn does
    expected = average_precision_score(targets, scores, average="macro")
    assert mean_average_precision(targets, scores) == pytest.approx(expected, abs=1e-12)


def test_classes_without_positive_are_skipped_and_counted():
    rng = np.random.default_rng(0)
    targets = (rng.random((50, 4)) < 0.5).astype(int)
    targets[:, 2] = 0
    scores = rng.random((50, 4))
    keep = [0, 1, 3]
    expected = average_precision_score(targets[:, keep], scores[:, keep], average="macro")
    assert mean_average_precision(targets, scores) == pytest.approx(expected)
    assert skipped_classes(targets) == 1
    assert np.isnan(average_precision_per_class(targets, scores)[2])


def test_unannotated_entries_are_left_out():
    targets = np.array([[1], [-1], [0], [1]])
    scores = np.array([[0.9], [0.95], [0.8], [0.1]])
    # without the -1 row: pos 0.9, neg 0.8, pos 0.1 -> (1 + 2/3) / 2
    assert mean_average_precision(targets, scores) == pytest.approx((1 + 2 / 3) / 2)


def test_perfect_and_reversed_rankings():
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    assert mean_average_precision(targets, targets * 0.9 + 0.05) == 1.0
    assert mean_average_precision(targets, 1 - targets) == pytest.approx(0.5)
