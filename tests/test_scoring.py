"""`aicoss score`, F1 / precision / recall at thresholds, fitted thresholds and the label files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

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

from helpers import ROOT, assert_one_line_error, leftovers

CLASSES = [f"digit_{d}" for d in range(10)]


# --------------------------------------------------------------------------- helpers


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _random_case(seed: int, n: int = 80, k: int = 6, unannotated: float = 0.0):
    """Targets (with -1 where unannotated) and probabilities that carry some signal, rounded to
    two decimals so there are ties at the thresholds."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.int8)
    p = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0, 1).round(2)
    if unannotated:
        y[rng.random((n, k)) < unannotated] = -1
    return y, p


def _files(tmp_path: Path, y: np.ndarray, p: np.ndarray, classes=CLASSES, shuffle: int | None = 0,
           img_path: bool = False) -> tuple[Path, Path]:
    """A submission and a labels CSV of the same images; the labels in another row order (and
    column order) than the submission, optionally train.csv-style with an img_path column."""
    ids = [f"IMG_{i:04d}" for i in range(len(y))]
    pred = _write(tmp_path / "pred.csv", ["img_id", *classes], [[i, *map(repr, row)] for i, row in zip(ids, p.tolist())])
    order = np.random.default_rng(shuffle).permutation(len(y)) if shuffle is not None else np.arange(len(y))
    cols = list(range(len(classes)))[::-1]
    header = ["img_id", *(["img_path"] if img_path else []), *[classes[c] for c in cols]]
    rows = [[ids[r], *([f"./train/{ids[r]}.jpg"] if img_path else []), *[int(y[r, c]) for c in cols]] for r in order]
    return pred, _write(tmp_path / "labels.csv", header, rows)


def _sklearn_expected(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> dict:
    """What scikit-learn says, class by class on the annotated rows (it takes no -1), macro over the
    classes with a positive, micro on the pooled annotated entries."""
    per = []
    for j in range(y.shape[1]):
        keep = y[:, j] != -1
        yt, yp = y[keep, j], (p[keep, j] >= t[j]).astype(int)
        prec, rec, f1, _ = precision_recall_fscore_support(yt, yp, average="binary", zero_division=0)
        ap = average_precision_score(yt, p[keep, j]) if yt.sum() else np.nan
        per.append({"ap": ap, "precision": prec, "recall": rec, "f1": f1, "positives": int(yt.sum())})
    scored = [r for r in per if r["positives"] > 0]
    keep = y != -1
    pooled = precision_recall_fscore_support(y[keep], (p >= t)[keep].astype(int), average="binary", zero_division=0)
    return {"per_class": per, "map": np.mean([r["ap"] for r in scored]),
            "macro": {m: np.mean([r[m] for r in scored]) for m in ("precision", "recall", "f1")},
            "micro": dict(zip(("precision", "recall", "f1"), pooled[:3]))}


def _score_json(run_cli, *args) -> dict:
    result = run_cli("score", *map(str, args), "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("seed", range(4))
def test_threshold_scores_match_scikit_learn_without_unannotated_entries(seed):
    y, p = _random_case(seed, k=8)
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


# --------------------------------------------------------------------------- aicoss score


@pytest.mark.parametrize("unannotated", [0.0, 0.25])
def test_score_equals_scikit_learn_on_shuffled_rows(run_cli, tmp_path, unannotated):
    y, p = _random_case(7, n=60, k=len(CLASSES), unannotated=unannotated)
    y[:, 3] = np.where(y[:, 3] == -1, -1, 0)  # a class with no positive
    pred, labels = _files(tmp_path, y, p, img_path=bool(unannotated))
    report = _score_json(run_cli, pred, labels)
    expected = _sklearn_expected(y, p, np.full(len(CLASSES), 0.5))
    assert report["images"] == 60 and report["classes_scored"] == 9
    assert report["map"] == pytest.approx(expected["map"], abs=1e-12)
    for average in ("micro", "macro"):
        assert report[average] == pytest.approx(expected[average], abs=1e-12)
    by_class = {r["class"]: r for r in report["per_class"]}
    for c, want in zip(CLASSES, expected["per_class"]):
        got = by_class[c]
        assert got["positives"] == want["positives"]
        assert (got["f1"], got["precision"], got["recall"]) == pytest.approx(
            (want["f1"], want["precision"], want["recall"]), abs=1e-12)
        assert (got["ap"] is None) if np.isnan(want["ap"]) else got["ap"] == pytest.approx(want["ap"], abs=1e-12)
    aps = [r["ap"] for r in report["per_class"] if r["ap"] is not None]
    assert aps == sorted(aps) and report["per_class"][-1]["class"] == "digit_3"  # weakest first, no AP last


def test_score_at_per_class_thresholds_from_a_csv(run_cli, tmp_path):
    y, p = _random_case(3, n=50, k=len(CLASSES))
    pred, labels = _files(tmp_path, y, p)
    t = np.round(np.linspace(0.2, 0.8, len(CLASSES)), 3)
    spec = _write(tmp_path / "t.csv", ["class", "threshold"], [[c, v] for c, v in reversed(list(zip(CLASSES, t)))])
    report = _score_json(run_cli, pred, labels, "--thresholds", spec)
    expected = _sklearn_expected(y, p, t)
    assert report["macro"] == pytest.approx(expected["macro"], abs=1e-12)
    assert report["micro"] == pytest.approx(expected["micro"], abs=1e-12)
    assert {r["class"]: r["threshold"] for r in report["per_class"]} == pytest.approx(dict(zip(CLASSES, t)))
    number = _score_json(run_cli, pred, labels, "--thresholds", "0.3")
    assert number["macro"]["f1"] == pytest.approx(
        f1_score(y, (p >= 0.3).astype(int), average="macro", zero_division=0), abs=1e-12)


def test_score_prints_tables_weakest_first(run_cli, tmp_path):
    y, p = _random_case(5, n=40, k=len(CLASSES))
    pred, labels = _files(tmp_path, y, p)
    result = run_cli("score", pred, labels)
    assert result.code == 0, result.stderr
    report = _score_json(run_cli, pred, labels)
    lines = result.stdout.splitlines()
    row_of = {c: next(i for i, line in enumerate(lines) if f" {c} " in line) for c in CLASSES}
    assert sorted(CLASSES, key=row_of.get) == [r["class"] for r in report["per_class"]]
    assert f"macro mAP {report['map']:.4f}" in result.stdout
    assert f"{report['macro']['f1']:.4f}" in result.stdout and "micro" in result.stdout


def test_score_json_is_json_only_and_names_round_trip(run_cli, tmp_path):
    classes = ['a,b', 'say "hi"', "🛰️ orbit", "plain"]
    y, p = _random_case(2, n=30, k=4)
    pred, labels = _files(tmp_path, y, p, classes=classes)
    result = run_cli("score", pred, labels, "--json")
    assert result.code == 0 and result.stderr == ""
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert sorted(r["class"] for r in report["per_class"]) == sorted(classes)


def test_score_with_labels_shaped_like_the_demo(run_cli, demo_root):
    """The demo's own test_labels.csv scored against itself as probabilities: everything is 1."""
    report = _score_json(run_cli, demo_root / "test_labels.csv", demo_root / "test_labels.csv")
    assert report["images"] == 40 and report["map"] == 1.0
    assert report["micro"] == {"f1": 1.0, "precision": 1.0, "recall": 1.0}


def _bad(tmp_path: Path, kind: str) -> tuple[Path, Path, tuple[str, ...]]:
    y, p = _random_case(1, n=12, k=3)
    classes = ["a", "b", "c"]
    pred, labels = _files(tmp_path, y, p, classes=classes, shuffle=None)
    rows = list(csv.reader(open(pred, newline="")))
    lab = list(csv.reader(open(labels, newline="")))
    if kind == "missing id":
        _write(pred, rows[0], rows[1:-1])
        return pred, labels, ("no row for img_id 'IMG_0011'", "1 ids missing")
    if kind == "extra id":
        _write(pred, rows[0], rows[1:] + [["IMG_9999", "0.1", "0.2", "0.3"]])
        return pred, labels, ("row 14", "'IMG_9999' is not in")
    if kind == "duplicate id":
        _write(labels, lab[0], lab[1:] + [lab[3]])
        return pred, labels, (str(labels), "row 14", "duplicate img_id 'IMG_0002'", "also row 4")
    if kind == "other classes":
        _write(pred, ["img_id", "a", "b", "z"], rows[1:])
        return pred, labels, ("missing 'c'", "extra 'z'")
    if kind == "duplicate class column":
        _write(pred, ["img_id", "a", "b", "b"], rows[1:])
        return pred, labels, (str(pred), "duplicated column 'b'")
    if kind == "not a number":
        rows[5][2] = "high"
        _write(pred, rows[0], rows[1:])
        return pred, labels, (str(pred), "row 6", "column 'b'", "'high' is not a number")
    if kind in ("nan", "inf", "above 1", "negative"):
        rows[3][1] = {"nan": "nan", "inf": "inf", "above 1": "1.5", "negative": "-0.01"}[kind]
        _write(pred, rows[0], rows[1:])
        return pred, labels, (str(pred), "row 4", "column 'a'", repr(rows[3][1]), "[0, 1]")
    if kind == "bad label":
        lab[2][3] = "2"
        _write(labels, lab[0], lab[1:])
        return pred, labels, (str(labels), "row 3", "label '2'")
    if kind == "empty label":
        lab[2][1] = ""
        _write(labels, lab[0], lab[1:])
        return pred, labels, (str(labels), "row 3", "label is empty")
    if kind == "short row":
        rows[4] = rows[4][:2]
        _write(pred, rows[0], rows[1:])
        return pred, labels, (str(pred), "row 5 has 2 fields", "header has 4")
    if kind == "no file":
        return tmp_path / "nope.csv", labels, ("nope.csv", "not found")
    if kind == "empty file":
        pred.write_text("")
        return pred, labels, (str(pred), "empty file")
    if kind == "not utf-8":
        pred.write_bytes(b"img_id,a,b,c\n\xff\xfe,0,0,0\n")
        return pred, labels, (str(pred), "not UTF-8")
    raise AssertionError(kind)


BAD = ["missing id", "extra id", "duplicate id", "other classes", "duplicate class column", "not a number", "nan",
       "inf", "above 1", "negative", "bad label", "empty label", "short row", "no file", "empty file", "not utf-8"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_score_input_is_one_line_and_exit_2(run_cli, tmp_path, kind):
    pred, labels, needles = _bad(tmp_path, kind)
    result = run_cli("score", pred, labels)
    assert_one_line_error(result, *needles)
    assert result.stdout == ""


@pytest.mark.parametrize("spec, needles", [
    ("1.5", ("--thresholds 1.5", "[0, 1]")),
    ("nan", ("--thresholds nan", "[0, 1]")),
    ("auto", ("--thresholds auto", "val split")),
    ("missing.csv", ("missing.csv", "not a number in [0, 1], `auto`, or an existing")),
])
def test_bad_threshold_option_is_one_line(run_cli, tmp_path, spec, needles):
    pred, labels = _files(tmp_path, *_random_case(0, n=10, k=len(CLASSES)))
    result = run_cli("score", pred, labels, "--thresholds", spec)
    assert_one_line_error(result, *needles)


@pytest.mark.parametrize("rows, needles", [
    ([["a", "0.5"], ["b", "0.5"]], ("no threshold for 1 of the 3 classes", "'c'")),
    ([["a", "0.5"], ["b", "0.5"], ["c", "0.5"], ["a", "0.4"]], ("row 5", "'a' is listed twice", "also row 2")),
    ([["a", "0.5"], ["b", "0.5"], ["zz", "0.5"]], ("row 4", "'zz' is not one of the 3 classes")),
    ([["a", "0.5"], ["b", "inf"], ["c", "0.5"]], ("row 3", "'inf' is not in [0, 1]")),
    ([["a", "0.5"], ["b", "x"], ["c", "0.5"]], ("row 3", "'x' is not a number")),
])
def test_bad_thresholds_csv_is_one_line(tmp_path, rows, needles):
    path = _write(tmp_path / "t.csv", ["class", "threshold"], rows)
    with pytest.raises(UserError) as info:
        read_thresholds_csv(path, ["a", "b", "c"])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message
    _write(tmp_path / "h.csv", ["class", "value"], [["a", "0.5"]])
    with pytest.raises(UserError, match="header must be `class,threshold`"):
        read_thresholds_csv(tmp_path / "h.csv", ["a"])


def test_score_help_does_not_import_torch():
    code = ("import sys; from aicoss_cli.cli import main; sys.argv = ['aicoss', 'score', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--thresholds" in result.stdout


# --------------------------------------------------------------------------- parse and resolve


def test_parse_threshold_spec(tmp_path):
    csv_path = _write(tmp_path / "t.csv", ["class", "threshold"], [["a", "0.5"]])
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
    path = _write(tmp_path / "t.csv", ["class", "threshold"], [["c", "0.3"], ["a", "0.1"], ["b", "0.2"]])
    resolved = resolve_thresholds(str(path), classes)
    assert resolved.values.tolist() == [0.1, 0.2, 0.3] and resolved.source == str(path)
    with pytest.raises(UserError, match="--labels auto fits"):
        resolve_thresholds("auto", classes)
    y, p = _random_case(4, n=100, k=3)
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
    y, p = _random_case(seed, n=120, k=5, unannotated=0.2 if seed else 0.0)  # ties from rounding; -1 entries
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
    y, p = _random_case(11, n=200, k=4)
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
    y, p = _random_case(9, n=160, k=5)
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
    y, p = _random_case(6, n=90, k=4)
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


def test_auto_thresholds_on_a_trained_run_label_its_submission(run_cli, demo_root, write_recipe, tmp_path):
    """The pieces the lead wires into predict: fit on a run's val_scores.csv, label its submission, score it."""
    from aicoss_cli.data.submission import read_labels_csv, read_probabilities_csv
    from aicoss_cli.data.tables import read_train

    from helpers import only_run_dir

    assert run_cli("train", write_recipe(demo_root, epochs=1), "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    val = read_probabilities_csv(run / "val_scores.csv")
    table = read_train(demo_root)
    row = {i: r for r, i in enumerate(table.ids)}
    auto = resolve_thresholds("auto", val.classes, table.labels[[row[i] for i in val.ids]], val.values)
    assert auto.held_out is not None and auto.held_out.n_fit == len(val.ids) // 2
    sub = read_probabilities_csv(run / "submission.csv")
    labels_path, thresholds_path = write_label_outputs(tmp_path / "sub.csv", sub.ids, sub.classes, sub.values, auto)
    sample = list(csv.reader(open(demo_root / "sample_submission.csv", newline="")))
    written = list(csv.reader(open(labels_path, newline="")))
    assert written[0] == sample[0] and [r[0] for r in written] == [r[0] for r in sample]
    assert {v for r in written[1:] for v in r[1:]} <= {"0", "1"}
    report = _score_json(run_cli, run / "submission.csv", demo_root / "test_labels.csv", "--thresholds", thresholds_path)
    truth = read_labels_csv(demo_root / "test_labels.csv")
    expected = _sklearn_expected(truth.values, sub.values, auto.values)  # both files are in sample_submission order
    assert report["macro"] == pytest.approx(expected["macro"], abs=1e-12)
