"""`aicoss train --folds K`: K fold runs in one folder, out-of-fold predictions from the model that
did not train on each image, the folds' mean on the test set equal to `aicoss ensemble` of the fold
checkpoints, and a killed cross-validation that resumes to the same files."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import exact_recipe, kill_when_saved, read_csv


def cv_parent(out: Path) -> Path:
    parents = [p for p in out.glob("*/*") if (p / "cv_recipe.toml").is_file()]
    assert len(parents) == 1, parents
    return parents[0]


def train_labels(root: Path):
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = rows[0][2:]
    return classes, [r[0] for r in rows[1:]], np.array([[int(v) for v in r[2:]] for r in rows[1:]])


def sklearn_map(targets: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    aps = [average_precision_score(targets[targets[:, k] >= 0, k] == 1, scores[targets[:, k] >= 0, k])
           for k in range(targets.shape[1]) if (targets[:, k] == 1).any()]
    return float(np.mean(aps))


def predicted_by(fold: Path, root: Path, img_ids: list[str]) -> np.ndarray:
    """Another fold's checkpoint on these images (it predicts them otherwise: the check can fail)."""
    from aicoss_cli.base.runtime import make_runtime
    from aicoss_cli.infer.forward import MemberSource, forward, load_members

    rt = make_runtime("cpu", "fp32", 0)
    members = load_members([MemberSource(fold / "best.safetensors")], rt)
    return forward(members, [str(root / "train" / f"{i}.jpg") for i in img_ids], rt, 64)[0].numpy()


@pytest.mark.slow
def test_a_3_fold_run_writes_its_folds_oof_summary_and_the_folds_mean_submission(
        run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=1)
    result = run_cli("train", recipe, "--folds", "3", "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    parent = cv_parent(tmp_path / "runs")
    assert parent.name.endswith("-cv3") and "out-of-fold" in result.stdout and "mean ± std" in result.stdout
    folds = [parent / f"fold{k}" for k in range(3)]
    for fold in folds:
        assert all((fold / f).is_file() for f in ("recipe.toml", "metrics.csv", "best.safetensors",
                                                  "val_scores.csv", "submission.csv"))
    classes, ids, targets = train_labels(demo_root)

    # oof.csv: train.csv's rows in order; each row is what its own fold's checkpoint predicts for it
    header, oof_ids, oof = read_csv(parent / "oof.csv")
    assert header == ["img_id", *classes] and oof_ids == ids
    from aicoss_cli.models.checkpoint import read_meta

    held_by = {}
    for k, fold in enumerate(folds):
        predicted = tmp_path / f"fold{k}_val.csv"
        assert run_cli("predict", fold / "best.safetensors", "--split", "val", "--out", predicted,
                       "--device", "cpu").code == 0
        _, val_ids, probs = read_csv(predicted)
        rows = [ids.index(i) for i in val_ids]
        np.testing.assert_allclose(oof[rows], probs, atol=2e-6)
        split = read_meta(fold / "best.safetensors").split
        assert (split["kind"], split["folds"], split["fold"]) == ("kfold", 3, k)
        held_by.update({i: k for i in val_ids})
        assert not np.allclose(predicted_by(folds[(k + 1) % 3], demo_root, val_ids), probs, atol=1e-3)
    assert sorted(held_by) == sorted(ids)  # every image held out by exactly one fold

    # cv.json: the folds' val mAPs (those of their metrics.csv), mean ± sample std, the OOF mAP
    summary = json.loads((parent / "cv.json").read_text())
    maps = [f["val_map"] for f in summary["fold_val_map"]]
    for k, fold in enumerate(folds):
        with open(fold / "metrics.csv", newline="") as f:
            best = max(float(r["val_map"]) for r in csv.DictReader(f))
        assert abs(maps[k] - best) < 1e-4
        rows = [i for i, img in enumerate(ids) if held_by[img] == k]
        assert summary["fold_val_map"][k]["n_val"] == len(rows)
        assert maps[k] == pytest.approx(sklearn_map(targets[rows], oof[rows]), abs=1e-9)
    assert summary["mean_val_map"] == pytest.approx(np.mean(maps), abs=1e-12)
    assert summary["std_val_map"] == pytest.approx(np.std(maps, ddof=1), abs=1e-12)
    assert summary["oof_map"] == pytest.approx(sklearn_map(targets, oof), abs=1e-9)
    assert summary["folds"] == 3 and summary["n_rows"] == len(ids)

    # submission.csv = `aicoss ensemble` of the 3 fold checkpoints, equal weights
    ensemble = tmp_path / "ensemble.csv"
    result = run_cli("ensemble", *(f / "best.safetensors" for f in folds), "--weights", "equal", "--out", ensemble,
                     "--device", "cpu")  # the device the recipe's summary ran on
    assert result.code == 0, result.stderr
    assert (parent / "submission.csv").read_text() == ensemble.read_text()
    means = np.mean([read_csv(f / "submission.csv")[2] for f in folds], axis=0)
    np.testing.assert_allclose(read_csv(parent / "submission.csv")[2], means, atol=2e-6)

    # `aicoss score oof.csv train.csv`: the OOF mAP again, from the labels' CSV itself
    scored = run_cli("score", parent / "oof.csv", demo_root / "train.csv", "--json")
    assert scored.code == 0, scored.stderr
    assert json.loads(scored.stdout)["map"] == pytest.approx(summary["oof_map"], abs=1e-9)


def test_one_fold_at_a_time_and_the_summary_with_the_last(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=1)
    first = run_cli("train", recipe, "--folds", "2", "--fold", "1", "--out", tmp_path / "runs")
    assert first.code == 0, first.stderr
    parent = cv_parent(tmp_path / "runs")
    assert (parent / "fold1" / "best.safetensors").is_file() and not (parent / "fold0").exists()
    assert not (parent / "oof.csv").exists() and "folds done: 1 of 2" in first.stdout
    missing = run_cli("cv", "summarize", parent)
    assert missing.code == 2 and "fold 0 of 2 is not finished" in missing.stderr and "--fold 0" in missing.stderr
    last = run_cli("train", "--resume", parent, "--fold", "0")
    assert last.code == 0, last.stderr
    assert all((parent / f).is_file() for f in ("oof.csv", "cv.json", "submission.csv"))
    written = {f: (parent / f).stat().st_mtime_ns for f in ("oof.csv", "cv.json", "submission.csv")}
    again = run_cli("train", "--resume", parent)
    assert again.code == 0 and "fold 0 was already trained" in again.stderr + again.stdout
    assert "out-of-fold" in again.stdout  # the table again, from the files: nothing rewritten
    assert written == {f: (parent / f).stat().st_mtime_ns for f in written}


def aicoss(*args, **kw) -> subprocess.Popen:
    import os
    import sys

    from helpers import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "aicoss_cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, text=True, **kw)


def fold_files(parent: Path) -> dict[str, str]:
    """What a finished cross-validation holds, without the wall-clock seconds."""
    from safetensors.torch import load_file

    out = {}
    for name in ("oof.csv", "submission.csv"):
        out[name] = (parent / name).read_text()
    summary = json.loads((parent / "cv.json").read_text())
    summary.pop("summary_seconds")
    out["cv.json"] = json.dumps(summary)
    for fold in sorted(parent.glob("fold*")):
        with open(fold / "metrics.csv", newline="") as f:
            out[f"{fold.name}/metrics"] = str([row[:-1] for row in csv.reader(f)])
        for name in ("val_scores.csv", "submission.csv"):
            out[f"{fold.name}/{name}"] = (fold / name).read_text()
        weights = load_file(str(fold / "last.safetensors"))
        out[f"{fold.name}/last"] = str({k: v.numpy().tobytes().hex() for k, v in sorted(weights.items())})
    return out


@pytest.mark.slow
def test_a_cross_validation_killed_mid_fold_resumes_to_the_same_files(demo_root, write_recipe, tmp_path):
    """2 folds × 2 epochs on the deterministic CPU; the run is killed in fold 1's second epoch, then
    `aicoss train --resume PARENT` skips fold 0 and resumes fold 1 from its state."""
    recipe = exact_recipe(write_recipe, demo_root, epochs=2)
    log = tmp_path / "straight.log"
    with open(log, "w") as straight_err:
        straight = aicoss("train", recipe, "--folds", "2", "--out", tmp_path / "straight", stderr=straight_err)
    proc = aicoss("train", recipe, "--folds", "2", "--out", tmp_path / "killed", stderr=subprocess.DEVNULL)
    killed_at = kill_when_saved(proc, lambda: list((tmp_path / "killed").glob("*/*/fold1")), epoch=1, step=1,
                                timeout=400)
    assert killed_at is not None, "the run ended before the test could kill it mid-fold"
    parent = cv_parent(tmp_path / "killed")
    assert not (parent / "oof.csv").exists() and not (parent / "fold1" / "submission.csv").exists()
    resumed = aicoss("train", "--resume", parent)
    _, stderr = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, stderr
    assert straight.wait(timeout=400) == 0, log.read_text()
    a, b = fold_files(cv_parent(tmp_path / "straight")), fold_files(parent)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_folds_with_nproc_train_each_fold_on_both_processes_in_turn(run_cli, demo_root, write_recipe, tmp_path):
    """`--folds 2 --nproc 2`: one CV folder, both gloo processes on fold 0 then on fold 1 (one process
    group for both), the same weights as one process, and rank 0 alone writes the summary."""
    from aicoss_cli.models.checkpoint import load_checkpoint

    recipe = write_recipe(demo_root, epochs=1)  # tiny_convnet: no batch norm, so 2 ranks train as one
    assert run_cli("train", recipe, "--folds", "2", "--out", tmp_path / "one").code == 0
    two = aicoss("train", recipe, "--folds", "2", "--nproc", "2", "--out", tmp_path / "two")
    _, stderr = two.communicate(timeout=400)
    assert two.returncode == 0, stderr[-3000:]
    one, parent = cv_parent(tmp_path / "one"), cv_parent(tmp_path / "two")
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["fold0", "fold1"]
    for k in (0, 1):
        a, b = (load_checkpoint(p / f"fold{k}" / "last.safetensors")[0] for p in (one, parent))
        assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-4  # float sums in another order
    np.testing.assert_allclose(read_csv(parent / "oof.csv")[2], read_csv(one / "oof.csv")[2], atol=1e-4)
    assert json.loads((parent / "cv.json").read_text())["folds"] == 2
