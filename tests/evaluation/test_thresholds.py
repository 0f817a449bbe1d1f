"""F1 / precision / recall at thresholds, the thresholds CSV, fitted thresholds and the label files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support

from aicoss_cli.base.errors import UserError
from aicoss_cli.evaluation.metrics import threshold_scores
from aicoss_cli.evaluation.score import per_class_rows, write_per_class_csv
from aicoss_cli.evaluation.thresholds import (
    fit_thresholds,
    held_out_threshold_gain,
    label_output_paths,
    parse_threshold_spec,
    read_thresholds_csv,
    resolve_thresholds,
    write_label_outputs,
)

from helpers import leftovers, random_scores, write_csv

# --------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("seed", range(4))
def test_threshold_scores_match_scikit_learn_without_unannotated_entries(seed):
    y, p = random_scores(seed, k=8)
    t = np.linspace(0.3, 0.7, 8)
    got = threshold_scores(y, p, t)
    pred = (p >= t).astype(int)
    for average in ("micro", "macro"):
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, average=average, zero_division=0)
        assert (getattr(got, f"{average}_precision"), getattr(got, f"{average}_recall"),
                getattr(got, f"{average}_f1")) == pytest.approx((prec, rec, f1), abs=1e-12)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose(got.precision, prec, atol=1e-12)
    np.testing.assert_allclose(got.recall, rec, atol=1e-12)
    np.testing.assert_allclose(got.f1, f1, atol=1e-12)
    np.testing.assert_array_equal(got.positives, support)


def test_class_without_positive_follows_zero_division_0_and_is_left_out_of_macro():
    y = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]])
    p = np.array([[0.9, 0.8, 0.1], [0.2, 0.1, 0.7], [0.4, 0.1, 0.2], [0.6, 0.3, 0.9]])
    got = threshold_scores(y, p, 0.5)
    # class 1: no positive, one false positive (0.8) → P = R = F1 = 0, as sklearn with zero_division=0
    prec, rec, f1, _ = precision_recall_fscore_support(y, (p >= 0.5).astype(int), average=None, zero_division=0)
    np.testing.assert_allclose([got.precision, got.recall, got.f1], [prec, rec, f1])
    assert got.skipped == 1
    # macro by hand over classes 0 and 2: class 0 TP 1 (0.9) FP 1 (0.6) FN 1 (0.4) → P = R = F1 = 1/2;
    # class 2: TP 1 (0.9) FP 1 (0.7) FN 0 → P = 1/2, R = 1, F1 = 2/3
    assert (got.macro_precision, got.macro_recall, got.macro_f1) == pytest.approx((0.5, 0.75, (0.5 + 2 / 3) / 2))
    # micro pools every class, the false positive of class 1 too: TP 2, FP 3, FN 1
    assert (got.micro_precision, got.micro_recall, got.micro_f1) == pytest.approx((2 / 5, 2 / 3, 4 / 8))


def test_unannotated_entries_are_left_out_of_the_decisions():
    y = np.array([[1], [-1], [0], [1]])
    p = np.array([[0.9], [0.95], [0.8], [0.1]])
    got = threshold_scores(y, p, 0.5)  # the -1 row would be a false positive: TP 1, FP 1, FN 1
    assert (got.precision[0], got.recall[0], got.f1[0]) == pytest.approx((0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- the thresholds CSV


@pytest.mark.parametrize("rows, needles", [
    ([["a", "0.5"], ["b", "0.5"]], ("no threshold for 1 of the 3 classes", "'c'")),
    ([["a", "0.5"], ["b", "0.5"], ["c", "0.5"], ["a", "0.4"]], ("row 5", "'a' is listed twice", "also row 2")),
    ([["a", "0.5"], ["b", "0.5"], ["zz", "0.5"]], ("row 4", "'zz' is not one of the 3 classes")),
    ([["a", "0.5"], ["b", "inf"], ["c", "0.5"]], ("row 3", "'inf' is not in [0, 1]")),
    ([["a", "0.5"], ["b", "x"], ["c", "0.5"]], ("row 3", "'x' is not a number")),
])
def test_bad_thresholds_csv_is_one_line(tmp_path, rows, needles):
    path = write_csv(tmp_path / "t.csv", ["class", "threshold"], rows)
    with pytest.raises(UserError) as info:
        read_thresholds_csv(path, ["a", "b", "c"])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message
    write_csv(tmp_path / "h.csv", ["class", "value"], [["a", "0.5"]])
    with pytest.raises(UserError, match="header must be `class,threshold`"):
        read_thresholds_csv(tmp_path / "h.csv", ["a"])


# --------------------------------------------------------------------------- parse and resolve


def test_parse_threshold_spec(tmp_path):
    csv_path = write_csv(tmp_path / "t.csv", ["class", "threshold"], [["a", "0.5"]])
    assert parse_threshold_spec("0.35") == 0.35 and parse_threshold_spec("1") == 1.0
    assert parse_threshold_spec(" AUTO ") == "auto"
    assert parse_threshold_spec(str(csv_path)) == csv_path
    for bad in ("-0.1", "1.0001", "inf", "nan", "1e999"):
        with pytest.raises(UserError, match=r"--labels .*\[0, 1\]"):
            parse_threshold_spec(bad)
    with pytest.raises(UserError, match="existing class,threshold CSV"):
        parse_threshold_spec(str(tmp_path / "none.csv"))


def test_resolve_thresholds_number_csv_and_auto(tmp_path):
    classes = ["a", "b", "c"]
    assert resolve_thresholds("0.25", classes).values.tolist() == [0.25] * 3
    path = write_csv(tmp_path / "t.csv", ["class", "threshold"], [["c", "0.3"], ["a", "0.1"], ["b", "0.2"]])
    resolved = resolve_thresholds(str(path), classes)
    assert resolved.values.tolist() == [0.1, 0.2, 0.3] and resolved.source == str(path)
    with pytest.raises(UserError, match="--labels auto fits"):
        resolve_thresholds("auto", classes)
    y, p = random_scores(4, n=100, k=3)
    y[:, 2] = 0
    y[:4, 2] = 1  # 4 positives: fewer than min_positives
    auto = resolve_thresholds("auto", classes, y, p)
    assert auto.fallback == ["c"] and auto.values[2] == auto.global_threshold
    assert auto.held_out is not None and auto.held_out.n_fit + auto.held_out.n_score == 100
    assert auto.source.startswith("auto")


# --------------------------------------------------------------------------- fitting


def _best_f1_by_brute_force(yj: np.ndarray, pj: np.ndarray) -> float:
    keep = yj != -1
    grid = np.r_[np.unique(pj[keep]), 1.01]
    return max(f1_score(yj[keep], (pj[keep] >= t).astype(int), zero_division=0) for t in grid)


@pytest.mark.parametrize("seed", range(3))
def test_fit_thresholds_finds_the_best_f1_and_beats_or_equals_one_half(seed):
    y, p = random_scores(seed, n=120, k=5, unannotated=0.2 if seed else 0.0)  # ties from rounding; -1 entries
    fit = fit_thresholds(y, p, min_positives=1)
    assert fit.fallback == []
    at_half = threshold_scores(y, p, 0.5).f1
    fitted = threshold_scores(y, p, fit.thresholds).f1
    assert np.all(fitted >= at_half - 1e-12)
    assert threshold_scores(y, p, fit.thresholds).macro_f1 >= threshold_scores(y, p, 0.5).macro_f1
    for j in range(y.shape[1]):  # and it is the optimum, by trying every threshold with scikit-learn
        assert fitted[j] == pytest.approx(_best_f1_by_brute_force(y[:, j], p[:, j]), abs=1e-12)
    np.testing.assert_allclose(fit.f1, fitted)
    assert np.all((fit.thresholds >= 0) & (fit.thresholds <= 1))


def test_fitted_threshold_lies_halfway_and_ties_go_to_the_highest():
    # positives at 0.8 and 0.6, negatives at 0.4 and 0.2: the best cut is between 0.6 and 0.4
    fit = fit_thresholds(np.array([[1], [1], [0], [0]]), np.array([[0.8], [0.6], [0.4], [0.2]]), min_positives=1)
    assert fit.thresholds[0] == pytest.approx(0.5) and fit.f1[0] == 1.0
    # the midpoint of 0.6957 and 0.6 is 0.64785; it is written with the fewest decimals near it: 0.65
    fit = fit_thresholds(np.array([[1], [0]]), np.array([[0.6957], [0.6]]), min_positives=1)
    assert fit.thresholds[0] == 0.65
    # scores 0.9 (pos), 0.8, 0.7 (neg), 0.6 (pos): F1 = 2·TP / (#predicted + 2) is 2/3 for {0.9}, 1/2, 2/5,
    # and 2/3 again for all four; the tie goes to the higher cut, halfway between 0.9 and 0.8
    fit = fit_thresholds(np.array([[1], [0], [0], [1]]), np.array([[0.9], [0.8], [0.7], [0.6]]), min_positives=1)
    assert fit.thresholds[0] == pytest.approx(0.85) and fit.f1[0] == pytest.approx(2 / 3)
    # when the best cut keeps every score there is nothing below: the lowest score itself
    fit = fit_thresholds(np.array([[1], [0], [1]]), np.array([[0.9], [0.6], [0.3]]), min_positives=1)
    assert fit.thresholds[0] == pytest.approx(0.3) and fit.f1[0] == pytest.approx(0.8)


def test_rare_classes_fall_back_to_the_best_global_threshold():
    y, p = random_scores(11, n=200, k=4)
    y[:, 1] = 0
    y[[3, 50, 90], 1] = 1    # 3 positives: below min_positives=5
    y[:, 3] = 0              # no positive at all
    fit = fit_thresholds(y, p, min_positives=5)
    assert fit.fallback == [1, 3]
    assert fit.thresholds[1] == fit.thresholds[3] == fit.global_threshold
    own = fit_thresholds(y[:, [0, 2]], p[:, [0, 2]], min_positives=1).thresholds  # the others keep their own fit
    assert fit.thresholds[[0, 2]].tolist() == own.tolist() and fit.thresholds[2] != fit.global_threshold
    # the global threshold is the best single threshold for macro F1 over the classes with a positive
    grid = np.r_[np.unique(p), 0.5]
    best = max(threshold_scores(y, p, t).macro_f1 for t in grid)
    assert threshold_scores(y, p, fit.global_threshold).macro_f1 == pytest.approx(best, abs=1e-12)
    assert threshold_scores(y, p, fit.global_threshold).macro_f1 >= threshold_scores(y, p, 0.5).macro_f1
    # with no positive anywhere there is nothing to fit: 0.5 for every class
    none = fit_thresholds(np.zeros((10, 2), dtype=int), np.random.default_rng(0).random((10, 2)))
    assert none.global_threshold == 0.5 and none.fallback == [0, 1] and none.thresholds.tolist() == [0.5, 0.5]


def test_held_out_gain_fits_on_one_half_and_scores_on_the_other():
    y, p = random_scores(9, n=160, k=5)
    held = held_out_threshold_gain(y, p, seed=0, min_positives=1)
    order = np.random.default_rng(0).permutation(160)
    a, b = np.sort(order[:80]), np.sort(order[80:])
    fit = fit_thresholds(y[a], p[a], min_positives=1)
    assert (held.n_fit, held.n_score) == (80, 80)
    assert held.auto_f1 == pytest.approx(threshold_scores(y[b], p[b], fit.thresholds).macro_f1)
    assert held.global_f1 == pytest.approx(threshold_scores(y[b], p[b], fit.global_threshold).macro_f1)
    assert held.default_f1 == pytest.approx(threshold_scores(y[b], p[b], 0.5).macro_f1)
    assert held.gain == pytest.approx(held.auto_f1 - held.global_f1)
    assert held_out_threshold_gain(y, p, seed=1, min_positives=1).n_fit == 80


# --------------------------------------------------------------------------- the files it writes


def test_label_outputs_have_the_submission_shape(tmp_path):
    classes = ['a,b', 'say "hi"', "🛰️ orbit"]
    ids = ["z9", "a1", "m5", "b,2"]
    probs = np.array([[0.9, 0.1, 0.5], [0.2, 0.7, 0.49999], [0.5, 0.5, 0.5], [0.0, 1.0, 0.3]], dtype=np.float32)
    thresholds = resolve_thresholds("0.5", classes)
    labels_path, thresholds_path = write_label_outputs(tmp_path / "sub.csv", ids, classes, probs, thresholds)
    assert (labels_path, thresholds_path) == label_output_paths(tmp_path / "sub.csv")
    assert labels_path.name == "sub_labels.csv" and thresholds_path.name == "sub_thresholds.csv"
    rows = list(csv.reader(open(labels_path, newline="", encoding="utf-8")))
    assert rows[0] == ["img_id", *classes] and [r[0] for r in rows[1:]] == ids
    assert [r[1:] for r in rows[1:]] == [["1", "0", "1"], ["0", "1", "0"], ["1", "1", "1"], ["0", "1", "0"]]
    assert read_thresholds_csv(thresholds_path, classes).tolist() == [0.5, 0.5, 0.5]
    assert leftovers(tmp_path) == []


def test_fitted_thresholds_round_trip_exactly(tmp_path):
    y, p = random_scores(6, n=90, k=4)
    p = p + np.random.default_rng(0).random(p.shape) * 1e-3  # fine-grained: midpoints with many digits
    p = np.clip(p, 0, 1)
    classes = ["w", "x", "y", "z"]
    auto = resolve_thresholds("auto", classes, y, p, min_positives=1)
    ids = [f"r{i}" for i in range(len(p))]
    labels_path, thresholds_path = write_label_outputs(tmp_path / "out.csv", ids, classes, p, auto)
    again = read_thresholds_csv(thresholds_path, classes)
    np.testing.assert_array_equal(again, auto.values)
    written = np.array([[int(v) for v in r[1:]] for r in list(csv.reader(open(labels_path)))[1:]])
    np.testing.assert_array_equal(written, (p >= auto.values).astype(int))
    assert set(np.unique(written)) <= {0, 1}
    rows = list(csv.reader(open(thresholds_path)))
    assert rows[0] == ["class", "threshold"] and [r[0] for r in rows[1:]] == classes
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows[1:])


def test_label_outputs_are_all_or_nothing(tmp_path, monkeypatch):
    import aicoss_cli.evaluation.thresholds as module

    target = tmp_path / "sub_labels.csv"
    target.write_text("what the user had\n")
    real = module.csv.writer
    calls = []

    def failing(f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the thresholds file
            raise OSError(28, "No space left on device")
        return real(f, *a, **k)

    monkeypatch.setattr(module.csv, "writer", failing)
    with pytest.raises(UserError, match="cannot be written"):
        write_label_outputs(tmp_path / "sub.csv", ["a"], ["c"], np.array([[0.7]]), 0.5)
    assert target.read_text() == "what the user had\n"
    assert not (tmp_path / "sub_thresholds.csv").exists() and leftovers(tmp_path) == []


def test_per_class_rows_and_csv(tmp_path):
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.6], [0.6, 0.4, 0.2], [0.1, 0.7, 0.3]])
    rows = per_class_rows(["first", "se,cond", "third"], y, p, [0.5, 0.5, 0.5])
    assert [r["class"] for r in rows] == ["first", "se,cond", "third"]
    # class 1: ranked 0.8 (pos), 0.7 (neg), 0.4 (pos), 0.2 (neg) → AP = (1 + 2/3) / 2; at 0.5: TP 1 FP 1 FN 1
    assert rows[1]["ap"] == pytest.approx((1 + 2 / 3) / 2) and rows[0]["ap"] == 1.0
    assert (rows[1]["f1"], rows[1]["precision"], rows[1]["recall"]) == pytest.approx((0.5, 0.5, 0.5))
    assert [r["rank"] for r in rows] == [2, 1, None] and rows[2]["positives"] == 0
    write_per_class_csv(tmp_path / "per_class_ap.csv", rows)
    back = list(csv.DictReader(open(tmp_path / "per_class_ap.csv", newline="")))
    assert list(back[0]) == ["class", "positives", "ap", "f1", "precision", "recall", "threshold", "rank"]
    assert back[1]["class"] == "se,cond" and float(back[1]["f1"]) == pytest.approx(0.5)
    assert back[2]["ap"] == "" and back[2]["rank"] == "" and back[2]["precision"] == "0.000000"
