"""`--labels T|auto|CSV` on predict and ensemble: the 0/1 labels, the thresholds, the JSON output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_one_line_error, read_csv, read_rows


@pytest.fixture
def trained(two_runs) -> Path:
    """best.safetensors of a short real run (thresholds need a model better than chance); read-only."""
    return two_runs[0] / "best.safetensors"


def test_a_number_labels_every_class_at_that_threshold(run_cli, trained, demo_root, tmp_path):
    out = tmp_path / "sub.csv"
    result = run_cli("predict", trained, "--out", out, "--labels", "0.3")
    assert result.code == 0, result.stderr
    header, ids, probs = read_csv(out)
    labels = read_rows(tmp_path / "sub_labels.csv")
    assert labels[0] == header and [r[0] for r in labels[1:]] == ids
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in labels[1:]]), (probs >= 0.3).astype(int))
    thresholds = read_rows(tmp_path / "sub_thresholds.csv")
    assert thresholds[0] == ["class", "threshold"] and [r[0] for r in thresholds[1:]] == header[1:]
    assert {float(r[1]) for r in thresholds[1:]} == {0.3}


def test_auto_labels_on_the_test_set_fit_on_val_and_report_the_held_out_gain(run_cli, trained, demo_root, tmp_path):
    from aicoss_cli.evaluation.thresholds import resolve_thresholds

    out = tmp_path / "sub.csv"
    result = run_cli("predict", trained, "--out", out, "--labels", "auto")
    assert result.code == 0, result.stderr
    assert "held out" in result.stdout and "gain" in result.stdout
    header, ids, probs = read_csv(out)
    sample = read_rows(demo_root / "sample_submission.csv")
    labels = read_rows(tmp_path / "sub_labels.csv")
    assert labels[0] == sample[0] and [r[0] for r in labels[1:]] == [r[0] for r in sample[1:]]
    values = {v for r in labels[1:] for v in r[1:]}
    assert values <= {"0", "1"}
    thresholds = {r[0]: float(r[1]) for r in read_rows(tmp_path / "sub_thresholds.csv")[1:]}
    assert list(thresholds) == header[1:] and all(0 <= t <= 1 for t in thresholds.values())
    # the thresholds are those fit on the checkpoint's own val predictions
    val = tmp_path / "val.csv"
    assert run_cli("predict", trained, "--split", "val", "--out", val).code == 0
    from aicoss_cli.data.tables import read_train

    vh, vids, vprobs = read_csv(val)
    table = read_train(demo_root)
    targets = np.stack([table.labels[table.ids.index(i)] for i in vids])
    expected = resolve_thresholds("auto", vh[1:], targets, vprobs)
    assert [thresholds[c] for c in vh[1:]] == pytest.approx(list(expected.values), abs=1e-6)


def test_predict_json_is_json_only_and_holds_the_files_and_scores(run_cli, trained, tmp_path):
    out = tmp_path / "val.csv"
    result = run_cli("predict", trained, "--split", "val", "--out", out, "--labels", "auto", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["out"] == str(out) and data["split"] == "val" and data["per_class_csv"] == str(tmp_path / "val_per_class.csv")
    per_class = {r["class"]: r for r in data["per_class"]}
    on_disk = {r["class"]: r for r in csv.DictReader(open(tmp_path / "val_per_class.csv"))}
    assert per_class.keys() == on_disk.keys()
    for name, row in per_class.items():
        assert float(on_disk[name]["f1"]) == pytest.approx(row["f1"], abs=1e-6)
        assert float(on_disk[name]["threshold"]) == pytest.approx(data["labels"]["thresholds"][name])
    assert data["labels"]["held_out"]["n_fit"] + data["labels"]["held_out"]["n_score"] == data["n_images"]


def test_ensemble_labels_are_the_combined_probabilities_at_the_thresholds(run_cli, trained, tmp_path):
    out = tmp_path / "ens.csv"
    result = run_cli("ensemble", trained, trained, "--out", out, "--labels", "0.4", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    _, ids, probs = read_csv(out)
    labels = read_rows(tmp_path / "ens_labels.csv")
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in labels[1:]]), (probs >= 0.4).astype(int))
    assert data["labels"]["labels_csv"] == str(tmp_path / "ens_labels.csv")
    assert len(data["per_class"]) == probs.shape[1] and (tmp_path / "ens_per_class.csv").is_file()
    assert json.loads((tmp_path / "ens.json").read_text())["labels"]["source"] == "0.4"


@pytest.mark.parametrize("spec, needle", [("1.5", "[0, 1]"), ("nan", "--labels"), ("missing.csv", "missing.csv")])
def test_bad_labels_are_one_line_errors_before_any_output(run_cli, trained, tmp_path, spec, needle):
    for command in (["predict", trained], ["ensemble", trained]):
        out = tmp_path / "o.csv"
        assert_one_line_error(run_cli(*command, "--out", out, "--labels", spec), needle)
        assert not list(tmp_path.glob("o*"))
