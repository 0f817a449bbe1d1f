"""Cross-validation from the command line: bad input in one line before any compute, `aicoss cv
summarize`, CV folders as ensemble members (weights and thresholds fit on their out-of-fold
predictions, held out by whole folds), and `aicoss report` of a CV folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_RECIPE, assert_one_line_error, read_csv


@pytest.fixture(scope="module")
def cvs(demo_root, tmp_path_factory) -> dict[str, Path]:
    """Finished 2-fold cross-validations of the tiny recipe: a and b on the same folds (other seeds),
    c = a with its folds numbered the other way round (its fold 0 holds out other images)."""
    from aicoss_cli.recipe import load_recipe, resolve_recipe
    from aicoss_cli.train.cv import run_cv, start_cv

    tmp = tmp_path_factory.mktemp("cv")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(arch="tiny_convnet", loss="bce", epochs=1, policy="weak", root=demo_root))
    out = {}
    for name, sets in (("a", []), ("b", ["runtime.seed=4"])):
        loaded = resolve_recipe(load_recipe(recipe, ["data.folds=2", *sets]))
        out[name] = run_cv(start_cv(loaded, tmp / name)).plan.parent
    out["c"] = tmp / "c" / out["a"].name
    shutil.copytree(out["a"], out["c"])
    (out["c"] / "fold0").rename(out["c"] / "swap")
    (out["c"] / "fold1").rename(out["c"] / "fold0")
    (out["c"] / "swap").rename(out["c"] / "fold1")
    return out


def sklearn_map(targets: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(targets[targets[:, k] >= 0, k] == 1, scores[targets[:, k] >= 0, k])
           for k in range(targets.shape[1]) if (targets[:, k] == 1).any()]
    return float(np.mean(aps))


def labels(root: Path) -> np.ndarray:
    with open(root / "train.csv", newline="") as f:
        return np.array([[int(v) for v in row[2:]] for row in list(csv.reader(f))[1:]])


@pytest.mark.parametrize("args, needles", [
    (["--folds", "1"], ["--folds 1", "at least 2 folds"]),
    (["--folds", "300"], ["[data] folds = 300 is more than its 240 images"]),
    (["--folds", "3", "--fold", "3"], ["--fold 3", "folds 0 to 2"]),
    (["--fold", "1"], ["--fold 1 needs --folds K"]),
    (["--folds", "2", "--fold", "-1"], ["--fold -1", "numbered from 0"]),
])
def test_bad_folds_are_one_line_before_any_compute(run_cli, demo_root, write_recipe, tmp_path, args, needles):
    result = run_cli("train", write_recipe(demo_root), "--out", tmp_path / "runs", *args)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*"))


def test_more_folds_than_the_rarest_class_allows_names_the_class(run_cli, data_copy, write_recipe, tmp_path):
    root = data_copy
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    column = rows[0].index("digit_5")
    positives = [r for r in rows[1:] if r[column] == "1"]
    for row in positives[2:]:  # digit_5 keeps 2 positive images
        row[column] = "0"
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = run_cli("train", write_recipe(root), "--folds", "3", "--out", tmp_path / "runs")
    assert_one_line_error(result, "class 'digit_5' has only 2 positive images", "--folds 2")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_folds_for_a_single_split_run_and_other_k_for_a_cv(run_cli, cvs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text("")
    assert_one_line_error(run_cli("train", "--resume", run, "--folds", "3"), "--folds", "not a cross-validation folder")
    assert_one_line_error(run_cli("train", "--resume", cvs["a"], "--folds", "3"),
                          "--folds 3", "is a 2-fold cross-validation")
    assert_one_line_error(run_cli("train", "--resume", cvs["a"], "--fold", "2"), "--fold 2", "folds 0 to 1")
    assert_one_line_error(run_cli("train", "--resume", cvs["a"], "--set", "optim.lr=0.1"),
                          "resumes as it was started")


def test_summarize_rewrites_the_same_files_and_refuses_a_folder_that_is_not_a_cv(run_cli, cvs, tmp_path):
    before = {name: (cvs["a"] / name).read_text() for name in ("oof.csv", "submission.csv")}
    result = run_cli("cv", "summarize", cvs["a"])
    assert result.code == 0, result.stderr
    assert "out-of-fold" in result.stdout and "mean ± std" in result.stdout
    assert before == {name: (cvs["a"] / name).read_text() for name in before}
    assert_one_line_error(run_cli("cv", "summarize", tmp_path), "not a cross-validation folder")


def test_an_ensemble_of_cv_folders_fits_weights_and_thresholds_on_out_of_fold_predictions(
        run_cli, cvs, demo_root, tmp_path):
    out = tmp_path / "ens.csv"
    result = run_cli("ensemble", cvs["a"], cvs["b"], "--weights", "auto", "--labels", "auto", "--out", out, "--json",
                     "--device", "cpu")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    targets = labels(demo_root)
    oof = [read_csv(cvs[n] / "oof.csv")[2] for n in ("a", "b")]
    weights = np.array([m["weight"] for m in report["members"]])
    assert report["n_val"] == len(targets) == 240 and weights.sum() == pytest.approx(1.0)
    assert [m["path"] for m in report["members"]] == [str(cvs["a"]), str(cvs["b"])]
    for member, probs in zip(report["members"], oof):
        assert member["val_map"] == pytest.approx(sklearn_map(targets, probs), abs=1e-6)
    assert report["val_map"] == pytest.approx(sklearn_map(targets, weights[0] * oof[0] + weights[1] * oof[1]), abs=1e-6)
    assert any("out-of-fold" in n for n in report["notes"])
    held = report["labels"]["held_out"]
    fold_sizes = {json.loads((cvs["a"] / "cv.json").read_text())["fold_val_map"][k]["n_val"] for k in (0, 1)}
    assert held["n_fit"] in fold_sizes and held["n_fit"] + held["n_score"] == 240  # one whole fold each side
    assert "out-of-fold" in report["labels"]["source"]
    # a member is its 2 fold checkpoints averaged: the members' own fold-mean submissions, weighted
    subs = [read_csv(cvs[n] / "submission.csv")[2] for n in ("a", "b")]
    np.testing.assert_allclose(read_csv(out)[2], weights[0] * subs[0] + weights[1] * subs[1], atol=3e-6)


def test_cv_folders_of_other_folds_or_beside_a_checkpoint_are_refused(run_cli, cvs, tmp_path):
    assert_one_line_error(run_cli("ensemble", cvs["a"], cvs["c"], "--out", tmp_path / "e.csv"),
                          str(cvs["c"]), "its folds differ", "fingerprint")
    assert_one_line_error(run_cli("ensemble", cvs["a"], cvs["b"] / "fold0" / "best.safetensors",
                                  "--out", tmp_path / "e.csv"), "a single checkpoint and cross-validation folders")
    assert not (tmp_path / "e.csv").exists()
    auto = run_cli("ensemble", *(cvs["a"] / f"fold{k}" / "best.safetensors" for k in (0, 1)), "--weights", "auto",
                   "--out", tmp_path / "e.csv")
    assert_one_line_error(auto, "--weights auto", "folds of one cross-validation", "pass its folder")


def test_report_of_a_cv_folder_draws_its_folds_and_the_spread_over_them(run_cli, cvs, demo_root, tmp_path):
    result = run_cli("report", cvs["a"], "--out", tmp_path / "report", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [Path(r["run_dir"]).name for r in report["runs"]] == ["fold0", "fold1"]
    summary = json.loads((cvs["a"] / "cv.json").read_text())
    (cv,) = report["cv"]
    assert cv["folds"] == 2 and cv["oof_map"] == pytest.approx(summary["oof_map"], abs=1e-12)
    assert cv["fold_val_map"] == pytest.approx([f["val_map"] for f in summary["fold_val_map"]], abs=1e-12)
    assert cv["std_val_map"] == pytest.approx(np.std(cv["fold_val_map"], ddof=1), abs=1e-12)
    assert {"curves", "per_class_ap", "cv_per_class_ap", "errors", "pr_curves"} <= set(report["pictures"])
    assert all(Path(p).is_file() for p in report["pictures"].values())
    # the error analysis of a CV folder is its out-of-fold rows: every training image, scored as oof.csv
    analysis = report["error_analysis"]
    assert "oof.csv" in analysis["source"] and analysis["images"] == summary["n_rows"]
    assert analysis["map"] == pytest.approx(summary["oof_map"], abs=1e-9)
