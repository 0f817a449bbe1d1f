"""Pretrained loading really works: the offline ImageNet weights beat random init at equal steps."""

from __future__ import annotations

import csv

import pytest

pytestmark = pytest.mark.slow  # fine-tuning from ImageNet weights

from helpers import ROOT, only_run_dir


@pytest.fixture(scope="module")
def demo64(tmp_path_factory):
    from aicoss_cli.data.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("data") / "demo64", n_train=400, n_test=10, size=64, seed=2)


def best_val_map(run) -> float:
    with open(run / "metrics.csv", newline="") as f:
        return max(float(row["val_map"]) for row in csv.DictReader(f))


def test_finetuning_offline_imagenet_weights_beats_random_init(run_cli, demo64, tmp_path):
    recipe = ROOT / "recipes" / "demo_pretrained.toml"
    common = ["--data", demo64, "--set", "optim.epochs=3", "--set", "optim.batch_size=32",
              "--set", "data.val_fraction=0.25", "--set", "runtime.device=cpu"]
    scores = {}
    for pretrained in ("true", "false"):
        out = tmp_path / pretrained
        result = run_cli("train", recipe, "--out", out, "--set", f"model.pretrained={pretrained}", *common)
        assert result.code == 0, result.stderr
        scores[pretrained] = best_val_map(only_run_dir(out))
    # 3 epochs of 9 steps: ImageNet features already separate the digits, random ones do not yet
    assert scores["true"] > scores["false"] + 0.1, scores
