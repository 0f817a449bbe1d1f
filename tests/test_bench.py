"""The bench scripts run end to end (tiny settings; two rounds, so outputs are written twice) and
print the ratios they exist for: a bench that rots (a changed API, an output it may no longer
overwrite) fails here, not on a user's GPU. Also the photo data set bench/photo_data.py builds."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

BENCHES = {
    "train_overhead.py": ["--arch", "tiny_convnet", "--size", "32", "--batch-size", "8", "--steps", "2",
                          "--rounds", "1", "--device", "cpu"],
    "inference_overhead.py": ["--images", "16", "--arch", "tiny_convnet", "--size", "32", "--batch-size", "8",
                              "--rounds", "2", "--members", "tiny_convnet@32,tiny_convnet@48"],
    "onnx_vs_torch.py": ["--images", "16", "--arch", "tiny_convnet", "--size", "32", "--batch-size", "8",
                         "--rounds", "2"],
}


def ratios(report: dict) -> dict[str, float]:
    if "ratios" in report:
        return report["ratios"]
    return {"onnxruntime / pytorch": report["ratio_onnxruntime_over_pytorch"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(BENCHES))
def test_a_bench_script_runs_and_prints_finite_ratios(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *BENCHES[script], "--json"], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    found = ratios(report)
    assert found, sorted(report)
    assert all(math.isfinite(v) and v > 0 for v in found.values()), found
    if script == "onnx_vs_torch.py":  # the same model in both runtimes
        assert report["max_probability_difference"] < 1e-4


def test_csv_sizes_times_each_step_of_the_scores_csvs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "csv_sizes.py"), "--images", "40", "--classes", "3",
                             "--rounds", "1"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("40 images x 3 classes"), result.stdout
    steps = [line.split() for line in result.stdout.splitlines()[1:]]
    assert len(steps) == 4 and all(math.isfinite(float(step[-5])) for step in steps), result.stdout
    assert not list(tmp_path.iterdir())  # the scratch folder is removed


def photo_data_module():
    spec = importlib.util.spec_from_file_location("photo_data", ROOT / "bench" / "photo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_photo_data_keeps_test_crops_off_the_training_pixels_and_the_starter_recipe_takes_it(run_cli, tmp_path):
    photo = photo_data_module()

    def area(x0, y0, x1, y1):
        return (x1 - x0) * (y1 - y0)

    for box in [b for _, boxes in photo.CLASSES.values() for b in boxes] + [b for _, b in photo.CLUTTER]:
        (tx0, ty0, tx1, ty1), (sx0, sy0, sx1, sy1) = photo.split_box(box, "train"), photo.split_box(box, "test")
        overlap = max(0, min(tx1, sx1) - max(tx0, sx0)) * max(0, min(ty1, sy1) - max(ty0, sy0))
        assert overlap == 0 and area(tx0, ty0, tx1, ty1) + area(sx0, sy0, sx1, sy1) == area(*box)
        assert min(sx1 - sx0, sy1 - sy0) >= 20  # room for a crop in the test part
    root = photo.build_photo_data(tmp_path / "photos", n_train=80, n_test=10, size=32, seed=0)
    with open(root / "train.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["img_id", "img_path", *photo.CLASSES]
    result = run_cli("validate", ROOT / "recipes" / "starter.toml", "--data", root)
    assert result.code == 0, result.stderr
    assert "80 labelled images" in result.stdout
