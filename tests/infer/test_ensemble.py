"""Ensemble weights: the auto weights fitted on the val split, their held-out gain, and the note when
equal weights lose to a member."""

from __future__ import annotations

import numpy as np
import pytest

from aicoss_cli.evaluation.metrics import mean_average_precision


def _synthetic_members(seed: int = 0):
    """Member 0 is informative, member 1 is noise, member 2 is informative but weaker."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((400, 6)) < 0.3).astype(np.int8)
    good = np.clip(targets * 0.3 + rng.random(targets.shape) * 0.7, 0, 1)
    noise = rng.random(targets.shape)
    weak = np.clip(targets * 0.1 + rng.random(targets.shape) * 0.9, 0, 1)
    return np.stack([good, noise, weak]), targets


def test_auto_weights_are_non_negative_sum_to_one_and_favour_the_informative_member():
    from aicoss_cli.infer.ensemble import fit_weights

    probs, targets = _synthetic_members()
    w = fit_weights(probs, targets)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w[0] > w[2] >= w[1]
    fitted = mean_average_precision(targets, np.tensordot(w, probs, axes=1))
    assert fitted >= mean_average_precision(targets, probs.mean(0))


def test_held_out_gain_fits_on_one_half_and_scores_on_the_other():
    from aicoss_cli.infer.ensemble import fit_weights, held_out_gain

    probs, targets = _synthetic_members(1)
    h = held_out_gain(probs, targets, seed=0)
    assert (h.n_fit, h.n_score) == (200, 200)
    order = np.random.default_rng(0).permutation(400)
    fit, score = np.sort(order[:200]), np.sort(order[200:])
    assert h.weights_fit == pytest.approx(list(fit_weights(probs[:, fit], targets[fit])))
    assert h.equal_map == pytest.approx(mean_average_precision(targets[score], probs[:, score].mean(0)))
    assert h.gain > 0  # dropping the noise member helps on unseen images too


def test_a_weak_ensemble_note_names_the_best_member():
    from aicoss_cli.infer.ensemble import MemberReport, weaker_than_best

    members = [MemberReport("a.safetensors", "x", 32, "none", 0.5, 0.61, None),
               MemberReport("b.safetensors", "x", 32, "none", 0.5, 0.42, None)]
    note = weaker_than_best("equal", 0.55, members)
    assert "0.5500" in note and "a.safetensors (0.6100)" in note and "--weights auto" in note
    assert weaker_than_best("spec", 0.55, members) is not None
    assert weaker_than_best("equal", 0.61, members) is None and weaker_than_best("auto", 0.55, members) is None
