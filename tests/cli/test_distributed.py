"""Data-parallel training on the CPU (gloo) equals the single-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a multi-process run

from helpers import ROOT, only_run_dir, read_rows

DDP = """
[runtime]
seed = 3
precision = "fp32"
device = "cpu"
num_workers = 0
"""


def ddp_recipe(write_recipe, root, **kw):
    # tiny_convnet has no batch norm: each rank's statistics would otherwise differ from the whole batch's
    path = write_recipe(root, arch="tiny_convnet", **kw)
    text = path.read_text()
    text = text[: text.index("[runtime]")] + DDP.lstrip()
    # 219 train / 21 val rows: 3 steps of 64, and an odd val set that 2 ranks cannot split evenly
    text = text.replace("val_fraction = 0.2", "val_fraction = 0.0875").replace("batch_size = 32", "batch_size = 64")
    path.write_text(text)
    return path


def weights(run):
    from aicoss_cli.models.checkpoint import load_checkpoint

    return load_checkpoint(run / "last.safetensors")[0]


def test_two_gloo_processes_match_one_process(run_cli, demo_root, write_recipe, tmp_path):
    """Weights, val scores, metrics and the weight EMA (which follows the synchronised weights)."""
    from safetensors.torch import load_file

    recipe = ddp_recipe(write_recipe, demo_root)
    recipe.write_text(recipe.read_text().replace("weight_decay = 0.0", "weight_decay = 0.0\nema_decay = 0.5"))
    assert run_cli("train", recipe, "--out", tmp_path / "one").code == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "aicoss_cli", "train", str(recipe), "--out", str(tmp_path / "two"), "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = only_run_dir(tmp_path / "one"), only_run_dir(tmp_path / "two")

    a, b = weights(one), weights(two)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff

    # val mAP gathered from both ranks without the duplicates a padded sampler would add
    val_one, val_two = read_rows(one / "val_scores.csv"), read_rows(two / "val_scores.csv")
    assert len(val_two) - 1 == 21 and len({r[0] for r in val_two[1:]}) == 21
    assert [r[0] for r in val_two] == [r[0] for r in val_one]
    m_one, m_two = read_rows(one / "metrics.csv"), read_rows(two / "metrics.csv")
    assert float(m_two[1][4]) == pytest.approx(float(m_one[1][4]), abs=1e-6)
    assert float(m_two[1][2]) == pytest.approx(float(m_one[1][2]), rel=1e-5)  # train loss reduced over ranks
    assert m_one[0][5] == "val_map_ema" and float(m_two[1][5]) == pytest.approx(float(m_one[1][5]), abs=1e-6)
    states = [load_file(str(run / "train_state.safetensors")) for run in (one, two)]
    emas = [{k: v for k, v in s.items() if k.startswith("extra.ema.")} for s in states]
    assert emas[0] and emas[0].keys() == emas[1].keys()
    assert max(float((emas[0][k].double() - emas[1][k].double()).abs().max()) for k in emas[0]) < 1e-5
    # rank 0 alone printed the table
    assert proc.stdout.count("best val mAP") == 1


def test_gradient_accumulation_equals_the_large_batch(run_cli, demo_root, write_recipe, tmp_path):
    recipe = ddp_recipe(write_recipe, demo_root)
    assert run_cli("train", recipe, "--out", tmp_path / "big").code == 0
    assert run_cli("train", recipe, "--out", tmp_path / "acc", "--set", "optim.grad_accumulation=4").code == 0
    a, b = weights(only_run_dir(tmp_path / "big")), weights(only_run_dir(tmp_path / "acc"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_batch_not_divisible_by_processes_and_accumulation_is_refused(run_cli, demo_root, write_recipe, tmp_path):
    recipe = ddp_recipe(write_recipe, demo_root)
    result = run_cli("train", recipe, "--out", tmp_path, "--set", "optim.grad_accumulation=5")
    assert result.code == 2 and "divisible by grad_accumulation" in result.stderr
    assert not tmp_path.joinpath("tiny").exists()
