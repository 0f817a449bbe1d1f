"""Weight EMA, which checkpoint is kept, early stopping and the evaluation precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import only_run_dir, read_csv, read_metrics, train_state_tensors


def test_ema_is_timms_update_computed_by_hand(run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    """Two optimizer steps with decay d: the first update copies the weights (timm counts steps from
    1), the second gives ema = d·w1 + (1 − d)·w2, w_t the raw weights after step t."""
    from timm.utils import ModelEmaV3

    raw_after: list[dict[str, torch.Tensor]] = []
    real = ModelEmaV3.update

    def record(self, model, step=None):  # the raw weights after each optimizer step, as the EMA is given them
        raw_after.append({k: v.detach().clone().double() for k, v in model.state_dict().items()})
        real(self, model, step=step)

    monkeypatch.setattr(ModelEmaV3, "update", record)
    # 192 train rows and a batch of 96: two steps in the one epoch
    recipe = write_recipe(demo_root, epochs=1, extra="")
    recipe.write_text(recipe.read_text().replace("batch_size = 32", "batch_size = 96")
                      .replace("weight_decay = 0.0", "weight_decay = 0.0\nema_decay = 0.75"))
    assert run_cli("train", recipe, "--out", tmp_path).code == 0
    run = only_run_dir(tmp_path)
    assert len(raw_after) == 2
    ema = {k[len("extra.ema."):]: v for k, v in train_state_tensors(run).items() if k.startswith("extra.ema.")}
    w1, w2 = raw_after
    for key, value in ema.items():
        if value.is_floating_point():
            expected = 0.75 * w1[key] + 0.25 * w2[key]
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert not all(torch.equal(ema[k].double(), w2[k]) for k in ema if ema[k].is_floating_point())
    rows = read_metrics(run)
    assert "val_map_ema" in rows[0]
    from aicoss_cli.models.checkpoint import load_checkpoint

    _, meta = load_checkpoint(run / "best.safetensors")
    better = "ema" if float(rows[0]["val_map_ema"]) > float(rows[0]["val_map"]) else "raw"
    assert meta.extra["weights"] == better
    assert meta.val_map == pytest.approx(max(float(rows[0]["val_map"]), float(rows[0]["val_map_ema"])), rel=1e-5)


def test_keep_last_submits_the_last_epoch_and_ensemble_takes_it(run_cli, demo_root, write_recipe, tmp_path,
                                                                 monkeypatch):
    recipe = write_recipe(demo_root, epochs=3, extra="")
    recipe.write_text(recipe.read_text().replace("[runtime]\n", '[runtime]\nkeep = "last"\n'))
    assert run_cli("train", recipe, "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    assert run_cli("predict", run / "last.safetensors", "--out", tmp_path / "last.csv").code == 0
    assert (tmp_path / "last.csv").read_bytes() == (run / "submission.csv").read_bytes()
    assert run_cli("predict", run / "last.safetensors", "--split", "val", "--out", tmp_path / "val.csv").code == 0
    assert (tmp_path / "val.csv").read_bytes() == (run / "val_scores.csv").read_bytes()
    monkeypatch.chdir(tmp_path)
    result = run_cli("ensemble", "--out", tmp_path / "ens.csv")
    assert result.code == 0, result.stderr
    members = json.loads((tmp_path / "ens.json").read_text())["members"]
    assert [m["path"] for m in members] == [str(Path("runs") / run.relative_to(tmp_path / "runs") / "last.safetensors")]


def test_keep_top_2_leaves_exactly_the_two_best_epochs(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=4, extra="")
    recipe.write_text(recipe.read_text().replace("[runtime]\n", "[runtime]\nkeep_top = 2\n"))
    assert run_cli("train", recipe, "--out", tmp_path).code == 0
    run = only_run_dir(tmp_path)
    rows = read_metrics(run)
    best_two = sorted(sorted(range(1, 5), key=lambda e: (-float(rows[e - 1]["val_map"]), e))[:2])
    assert sorted(p.name for p in run.glob("epoch*.safetensors")) == [f"epoch{e:02d}.safetensors" for e in best_two]
    from aicoss_cli.models.checkpoint import read_meta

    assert [read_meta(run / f"epoch{e:02d}.safetensors").epoch for e in best_two] == best_two


def test_early_stopping_stops_on_a_plateau_and_finishes_the_run(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=6, extra="")
    text = recipe.read_text().replace("lr = 3e-3", "lr = 1e-30").replace("min_lr = 1e-4", "min_lr = 1e-30")
    recipe.write_text(text.replace("weight_decay = 0.0", "weight_decay = 0.0\nearly_stop_patience = 2"))
    result = run_cli("train", recipe, "--out", tmp_path)
    assert result.code == 0, result.stderr
    run = only_run_dir(tmp_path)
    rows = read_metrics(run)
    assert len({r["val_map"] for r in rows}) == 1  # the weights do not move: a plateau from epoch 1
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # best at 1, nothing better at 2 and 3: stop
    assert "early stop after epoch 3" in result.stdout + result.stderr
    assert (run / "submission.csv").is_file()
    again = run_cli("train", "--resume", run)
    assert again.code == 0 and "already complete" in again.stdout and len(read_metrics(run)) == 3


def test_training_in_bf16_validates_in_fp32_as_predict_does(run_cli, demo_root, write_recipe, tmp_path):
    from aicoss_cli.data.tables import read_train
    from aicoss_cli.evaluation.metrics import mean_average_precision

    recipe = write_recipe(demo_root, epochs=1, extra="")
    recipe.write_text(recipe.read_text().replace('precision = "fp32"', 'precision = "bf16"'))
    assert run_cli("train", recipe, "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    result = run_cli("predict", run / "best.safetensors", "--split", "val", "--out", tmp_path / "val.csv")
    assert result.code == 0, result.stderr
    _, ids, probs = read_csv(tmp_path / "val.csv")
    table = read_train(demo_root)
    targets = np.stack([table.labels[table.ids.index(i)] for i in ids])
    assert float(read_metrics(run)[0]["val_map"]) == pytest.approx(mean_average_precision(targets, probs), abs=1e-6)
    bf16 = run_cli("train", recipe, "--out", tmp_path / "bf16", "--set", "runtime.eval_precision=bf16")
    assert bf16.code == 0
    assert (only_run_dir(tmp_path / "bf16") / "val_scores.csv").read_bytes() != (run / "val_scores.csv").read_bytes()


def test_a_val_split_without_any_positive_is_refused_before_training(run_cli, demo_root, write_recipe, tmp_path):
    import shutil

    from aicoss_cli.data.splits import split_indices
    from aicoss_cli.data.tables import read_train

    from helpers import assert_one_line_error

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    _, val = split_indices(read_train(data).labels, "random", 0.05, 78)  # the split depends on the row count only
    lines = (data / "train.csv").read_text().splitlines()
    header, rows = lines[0], [line.split(",") for line in lines[1:]]
    for i in val:  # every label of the val rows 0: no val positive for any class
        rows[i][2:] = ["0"] * (len(rows[i]) - 2)
    (data / "train.csv").write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    recipe = write_recipe(data, epochs=1)
    result = run_cli("train", recipe, "--out", tmp_path / "runs", "--set", "data.val_fraction=0.05")
    assert_one_line_error(result, "no positive label", "val_fraction")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["a file", "under /sys"])
def test_an_unusable_out_folder_is_refused_before_any_compute(run_cli, demo_root, write_recipe, tmp_path, where):
    from helpers import assert_one_line_error

    out = tmp_path / "file"
    if where == "a file":
        out.write_text("mine")
    else:
        out = Path("/sys/aicoss-test-out")
    result = run_cli("train", write_recipe(demo_root, epochs=1), "--out", out)
    assert_one_line_error(result, str(out))
    if where == "a file":
        assert out.read_text() == "mine"


def test_a_full_disk_stops_the_run_naming_the_folder_and_the_space_and_keeps_the_state(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def full_after_epoch_1(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # last, best and the state of epoch 1 fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_epoch_1)
    result = run_cli("train", write_recipe(demo_root, epochs=2), "--out", tmp_path)
    run = only_run_dir(tmp_path)
    assert result.code == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped:") and str(run) in line and "No space left on device" in line
    assert "MiB" in line and "epoch 1" in line and f"--resume {run}" in line
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert run_cli("train", "--resume", run).code == 0 and len(read_metrics(run)) == 2


def test_a_non_finite_loss_before_any_checkpoint_names_no_file_as_kept(run_cli, demo_root, write_recipe, tmp_path,
                                                                        monkeypatch):
    import aicoss_cli.losses.registry as losses

    real_build = losses.build_loss

    def nan_at_once(name, **params):
        loss = real_build(name, **params)
        forward = loss.forward
        loss.forward = lambda logits, targets: forward(logits, targets) * float("nan")
        return loss

    monkeypatch.setattr(losses, "build_loss", nan_at_once)
    result = run_cli("train", write_recipe(demo_root, epochs=2), "--out", tmp_path)
    assert result.code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss at epoch 1, step 1" in line and "no checkpoint had been written yet" in line
    assert ".safetensors" not in line
