"""MLflow refuses metric names longer than 250 characters: a class name that long is shortened (with
a hash of the whole name, so two long names stay apart) and every metric is still logged."""

from __future__ import annotations

import shutil

import pytest

from helpers import only_run_dir

LONG = "a_very_long_class_name_" * 14  # 322 characters


@pytest.mark.slow  # a training run with MLflow's SQLite store: ~12 s on 2 shared cores
def test_a_300_character_class_name_keeps_mlflow_on(run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for name in ("train.csv", "sample_submission.csv"):
        text = (root / name).read_text()
        (root / name).write_text(text.replace("digit_0,", f"{LONG}0,", 1).replace("digit_1,", f"{LONG}1,", 1))
    recipe = write_recipe(root)
    recipe.write_text(recipe.read_text().replace("[runtime]\n", '[runtime]\nloggers = ["mlflow"]\n'))
    result = run_cli("train", recipe, "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    assert "mlflow" not in result.stderr + result.stdout, result.stderr  # no warning, no switch-off
    only_run_dir(tmp_path / "runs")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    keys = set(run.data.metrics)
    assert {"val_mAP", "train_loss", "val_loss"} <= keys
    per_class = sorted(k for k in keys if k.startswith("val_AP/"))
    assert len(per_class) == 10 and all(len(k) <= 250 for k in per_class), per_class
    long_ones = [k for k in per_class if k.startswith("val_AP/a_very_long")]
    assert len(long_ones) == 2 and long_ones[0] != long_ones[1]
