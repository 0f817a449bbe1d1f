"""`aicoss report`'s error analysis end to end: a trained tiny run on the demo data, labels flipped
on purpose, a prediction CSV against its labels, and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_RECIPE, assert_one_line_error, assert_picture, cli_in_process, read_csv, write_csv

FILES = ("errors.png", "pr_curves.png", "cooccurrence.png", "suspect_labels.csv", "report.html")


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory) -> Path:
    """A finished 2-epoch tiny_convnet run on the demo data (read-only for the tests); lr 3e-2 makes its
    most confident calls out-score every label it already disagrees with (by about 0.01)."""
    base = tmp_path_factory.mktemp("errors_run")
    recipe = base / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(arch="tiny_convnet", loss="bce", epochs=2, policy="none", root=demo_root))
    result = cli_in_process("train", recipe, "--out", base / "runs", "--set", "optim.lr=3e-2")
    assert result.code == 0, result.stderr
    (run_dir,) = [p for p in (base / "runs" / "tiny").iterdir() if p.is_dir()]
    return run_dir


def _labels(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: r for r in rows[1:]}


def _suspects(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_and_its_data_give_the_five_files_and_the_numbers_of_its_val_split(run_cli, run, demo_root, tmp_path):
    from aicoss_cli.results.html import is_report_page
    from aicoss_cli.results.pictures import is_report_picture

    out = tmp_path / "report"
    result = run_cli("report", run, "--data", demo_root, "--out", out, "--classes", "digit_3", "--json")
    assert result.code == 0, result.stderr
    for name in FILES + ("errors_digit_3.png",):
        assert (out / name).is_file(), name
    for name in ("errors.png", "errors_digit_3.png", "pr_curves.png", "cooccurrence.png"):
        assert_picture(out / name)
        assert is_report_picture(out / name)
    assert is_report_page(out / "report.html")
    got = json.loads(result.stdout)["error_analysis"]

    # the false positives and negatives of each class at 0.5, from the files alone
    header, ids, scores = read_csv(run / "val_scores.csv")
    columns, rows = _labels(demo_root)
    y = np.array([[int(rows[i][columns.index(c)]) for c in header[1:]] for i in ids])
    assert got["images"] == len(ids) and got["split"] == "val" and got["unreadable_images"] == {}
    for entry in got["worst_classes"]:
        j = header[1:].index(entry["class"])
        assert entry["false_positives"] == int(((y[:, j] == 0) & (scores[:, j] >= 0.5)).sum())
        assert entry["false_negatives"] == int(((y[:, j] == 1) & (scores[:, j] < 0.5)).sum())

    test = run_cli("report", run, "--data", demo_root, "--out", tmp_path / "test", "--split", "test", "--json")
    assert test.code == 0, test.stderr
    got = json.loads(test.stdout)["error_analysis"]
    assert (got["split"], got["images"]) == ("test", 40)


def test_labels_flipped_on_purpose_top_the_suspect_list(run_cli, run, data_copy, tmp_path):
    header, ids, scores = read_csv(run / "val_scores.csv")
    classes = header[1:]
    columns, rows = _labels(data_copy)
    y = np.array([[int(rows[i][columns.index(c)]) for c in classes] for i in ids])
    # the model's most confident calls: flipped, each contradicts its new label more than any
    # label it already disagrees with (agreement a = s for a positive, 1 - s for a negative)
    agree = np.where(y == 1, scores, 1 - scores)
    worst_disagreement = 1 - agree.min()
    order = np.argsort(-agree, axis=None, kind="stable")[:3]
    flips = [tuple(int(v) for v in np.unravel_index(k, y.shape)) for k in order]
    assert all(agree[f] > worst_disagreement for f in flips), "the trained run is not confident enough"

    data = data_copy
    for r, c in flips:
        rows[ids[r]][columns.index(classes[c])] = str(1 - y[r, c])
    write_csv(data / "train.csv", columns, list(rows.values()))
    now_positive = [scores[f] for f in flips if y[f] == 0]
    now_negative = [scores[f] for f in flips if y[f] == 1]
    below = max(now_positive) + 1e-6 if now_positive else 0.0
    above = min(now_negative) - 1e-6 if now_negative else 1.0

    out = tmp_path / "report"
    result = run_cli("report", run, "--data", data, "--out", out, "--suspect-below", f"{below:.9f}",
                     "--suspect-above", f"{above:.9f}")
    assert result.code == 0, result.stderr
    top = _suspects(out / "suspect_labels.csv")[:3]
    assert [(s["img_id"], s["class"]) for s in top] == [(ids[r], classes[c]) for r, c in flips]
    for s, (r, c) in zip(top, flips):
        assert int(s["label"]) == 1 - y[r, c] and float(s["score"]) == pytest.approx(scores[r, c], abs=1e-9)
        assert s["img_path"] == os.path.abspath(data / rows[ids[r]][1])


def test_a_prediction_csv_of_every_train_image_is_analysed_against_train_csv(run_cli, demo_root, tmp_path):
    columns, rows = _labels(demo_root)
    classes = columns[2:]
    y = np.array([[int(v) for v in r[2:]] for r in rows.values()])
    rng = np.random.default_rng(0)
    s = np.round(0.1 + 0.5 * y + 0.3 * rng.random(y.shape), 6)  # in [0.1, 0.9]: no suspect by chance
    ids = list(rows)
    planted = [(5, 2, 0.999), (17, 0, 0.985), (40, 7, 0.003), (41, 7, 0.012)]  # (row, class, score)
    for r, c, value in planted:
        y_rc = 0 if value > 0.5 else 1
        rows[ids[r]][2 + c] = str(y_rc)  # a label the score contradicts
        s[r, c] = value
    labels = write_csv(tmp_path / "train.csv", columns, list(rows.values()))
    oof = write_csv(tmp_path / "oof.csv", ["img_id", *classes], [[i, *v] for i, v in zip(ids, s.tolist())])
    out = tmp_path / "report"
    result = run_cli("report", oof, "--labels", labels, "--data", demo_root, "--out", out)
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    # by hand: contradictions 0.999, 1 - 0.003 = 0.997, 1 - 0.012 = 0.988, 0.985
    expected = [(ids[5], classes[2]), (ids[40], classes[7]), (ids[41], classes[7]), (ids[17], classes[0])]
    assert [(r["img_id"], r["class"]) for r in _suspects(out / "suspect_labels.csv")] == expected
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "train/" in page and "could not be read" not in page


@pytest.mark.parametrize("change, needle", [
    (lambda text: text.replace("TEST_00000", "NOT_AN_ID", 1), "is not in"),
    (lambda text: text.replace("digit_9", "digit_nine", 1), "class columns differ"),
], ids=["ids", "classes"])
def test_a_prediction_csv_that_does_not_match_its_labels_is_the_one_line_error_of_score(
        run_cli, demo_root, tmp_path, change, needle):
    labels = demo_root / "test_labels.csv"
    text = labels.read_text()
    pred = tmp_path / "pred.csv"
    pred.write_text(change(text))
    out = tmp_path / "report"
    result = run_cli("report", pred, "--labels", labels, "--out", out)
    assert_one_line_error(result, needle)
    assert result.stderr == run_cli("score", pred, labels).stderr  # the same words as `aicoss score`
    assert not out.exists()


def test_a_data_root_without_its_images_still_gives_the_numbers_and_names_what_is_missing(
        run_cli, run, data_copy, tmp_path):
    data = data_copy
    for folder in ("train", "test"):
        shutil.rmtree(data / folder)
    out = tmp_path / "report"
    result = run_cli("report", run, "--data", data, "--out", out)
    assert result.code == 0, result.stderr
    for name in FILES:
        assert (out / name).is_file(), name
    notes = " ".join(result.stdout.split())  # a note may wrap
    assert "could not be read" in notes and "missing" in notes and str(data / "train") in notes
    assert "grey box" in (out / "report.html").read_text(encoding="utf-8")


def test_bad_combinations_are_one_line_errors_and_a_users_files_are_left_alone(run_cli, run, demo_root, tmp_path):
    pred = tmp_path / "pred.csv"
    shutil.copy(run / "val_scores.csv", pred)
    assert_one_line_error(run_cli("report", pred), "--labels FILE")
    assert_one_line_error(run_cli("report", pred, run, "--labels", demo_root / "train.csv"), "reported alone")
    assert_one_line_error(run_cli("report", run, "--labels", demo_root / "train.csv"), "--labels goes with")
    assert_one_line_error(run_cli("report", run, "--data", demo_root, "--classes", "digit_3,nope"),
                          "'nope' is not a class")
    out = tmp_path / "mine"
    out.mkdir()
    for name, content in (("report.html", "<p>my page</p>"), ("suspect_labels.csv", "id,why\n1,mine\n")):
        (out / name).write_text(content)
        assert_one_line_error(run_cli("report", run, "--data", demo_root, "--out", out), name,
                              "not written by aicoss report")
        assert (out / name).read_text() == content
        (out / name).unlink()
    assert not any(out.iterdir())
