"""`aicoss score` through the real CLI: the numbers against scikit-learn, the tables, the JSON, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support

from aicoss_cli.evaluation.thresholds import resolve_thresholds, write_label_outputs

from helpers import assert_one_line_error, random_scores, write_csv

CLASSES = [f"digit_{d}" for d in range(10)]


def _files(tmp_path: Path, y: np.ndarray, p: np.ndarray, classes=CLASSES, shuffle: int | None = 0,
           img_path: bool = False) -> tuple[Path, Path]:
    """A submission and a labels CSV of the same images; the labels in another row order (and
    column order) than the submission, optionally train.csv-style with an img_path column."""
    ids = [f"IMG_{i:04d}" for i in range(len(y))]
    pred = write_csv(tmp_path / "pred.csv", ["img_id", *classes], [[i, *map(repr, row)] for i, row in zip(ids, p.tolist())])
    order = np.random.default_rng(shuffle).permutation(len(y)) if shuffle is not None else np.arange(len(y))
    cols = list(range(len(classes)))[::-1]
    header = ["img_id", *(["img_path"] if img_path else []), *[classes[c] for c in cols]]
    rows = [[ids[r], *([f"./train/{ids[r]}.jpg"] if img_path else []), *[int(y[r, c]) for c in cols]] for r in order]
    return pred, write_csv(tmp_path / "labels.csv", header, rows)


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


@pytest.mark.parametrize("unannotated", [0.0, 0.25])
def test_score_equals_scikit_learn_on_shuffled_rows(run_cli, tmp_path, unannotated):
    y, p = random_scores(7, n=60, k=len(CLASSES), unannotated=unannotated)
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
    y, p = random_scores(3, n=50, k=len(CLASSES))
    pred, labels = _files(tmp_path, y, p)
    t = np.round(np.linspace(0.2, 0.8, len(CLASSES)), 3)
    spec = write_csv(tmp_path / "t.csv", ["class", "threshold"], [[c, v] for c, v in reversed(list(zip(CLASSES, t)))])
    report = _score_json(run_cli, pred, labels, "--thresholds", spec)
    expected = _sklearn_expected(y, p, t)
    assert report["macro"] == pytest.approx(expected["macro"], abs=1e-12)
    assert report["micro"] == pytest.approx(expected["micro"], abs=1e-12)
    assert {r["class"]: r["threshold"] for r in report["per_class"]} == pytest.approx(dict(zip(CLASSES, t)))
    number = _score_json(run_cli, pred, labels, "--thresholds", "0.3")
    assert number["macro"]["f1"] == pytest.approx(
        f1_score(y, (p >= 0.3).astype(int), average="macro", zero_division=0), abs=1e-12)


def test_score_prints_tables_weakest_first(run_cli, tmp_path):
    y, p = random_scores(5, n=40, k=len(CLASSES))
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
    y, p = random_scores(2, n=30, k=4)
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
    y, p = random_scores(1, n=12, k=3)
    classes = ["a", "b", "c"]
    pred, labels = _files(tmp_path, y, p, classes=classes, shuffle=None)
    rows = list(csv.reader(open(pred, newline="")))
    lab = list(csv.reader(open(labels, newline="")))
    if kind == "missing id":
        write_csv(pred, rows[0], rows[1:-1])
        return pred, labels, ("no row for img_id 'IMG_0011'", "1 ids missing")
    if kind == "extra id":
        write_csv(pred, rows[0], rows[1:] + [["IMG_9999", "0.1", "0.2", "0.3"]])
        return pred, labels, ("row 14", "'IMG_9999' is not in")
    if kind == "duplicate id":
        write_csv(labels, lab[0], lab[1:] + [lab[3]])
        return pred, labels, (str(labels), "row 14", "duplicate img_id 'IMG_0002'", "also row 4")
    if kind == "other classes":
        write_csv(pred, ["img_id", "a", "b", "z"], rows[1:])
        return pred, labels, ("missing 'c'", "extra 'z'")
    if kind == "duplicate class column":
        write_csv(pred, ["img_id", "a", "b", "b"], rows[1:])
        return pred, labels, (str(pred), "duplicated column 'b'")
    if kind == "not a number":
        rows[5][2] = "high"
        write_csv(pred, rows[0], rows[1:])
        return pred, labels, (str(pred), "row 6", "column 'b'", "'high' is not a number")
    if kind in ("nan", "inf", "above 1", "negative"):
        rows[3][1] = {"nan": "nan", "inf": "inf", "above 1": "1.5", "negative": "-0.01"}[kind]
        write_csv(pred, rows[0], rows[1:])
        return pred, labels, (str(pred), "row 4", "column 'a'", repr(rows[3][1]), "[0, 1]")
    if kind == "bad label":
        lab[2][3] = "2"
        write_csv(labels, lab[0], lab[1:])
        return pred, labels, (str(labels), "row 3", "label '2'")
    if kind == "empty label":
        lab[2][1] = ""
        write_csv(labels, lab[0], lab[1:])
        return pred, labels, (str(labels), "row 3", "label is empty")
    if kind == "short row":
        rows[4] = rows[4][:2]
        write_csv(pred, rows[0], rows[1:])
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
    pred, labels = _files(tmp_path, *random_scores(0, n=10, k=len(CLASSES)))
    result = run_cli("score", pred, labels, "--thresholds", spec)
    assert_one_line_error(result, *needles)


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
