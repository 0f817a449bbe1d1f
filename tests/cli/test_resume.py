"""Exact resume after SIGKILL, refusal of changed recipes, and no lost work."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, exact_recipe, kill_when_saved, only_run_dir, state_progress, train_state_tensors


def metrics_without_seconds(run: Path) -> list[list[str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [row[:-1] for row in csv.reader(f)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from aicoss_cli.models.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


def aicoss(*args, **kw) -> subprocess.Popen:
    """`aicoss ARGS` in a fresh process: single-threaded, so float reductions run in one fixed order
    and nothing set by other tests in this process leaks in."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "aicoss_cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(demo_root, write_recipe, tmp_path):
    """With weight EMA on, so its state must come back too. The straight run and the run to be
    killed start together (one thread each)."""
    recipe = exact_recipe(write_recipe, demo_root)
    recipe.write_text(recipe.read_text().replace("weight_decay = 0.0",
                                                 "weight_decay = 0.0\nema_decay = 0.9\nema_warmup = true"))
    log = tmp_path / "straight.log"
    with open(log, "w") as straight_err:  # a file, not a pipe nobody reads while the test waits
        straight_proc = aicoss("train", recipe, "--out", tmp_path / "straight", stderr=straight_err)
    proc = aicoss("train", recipe, "--out", tmp_path / "killed", stderr=subprocess.DEVNULL)
    # killed in the second epoch, mid-way
    killed_at = kill_when_saved(proc, lambda: list((tmp_path / "killed").glob("*/*")), epoch=1, step=2, timeout=240)
    assert killed_at is not None, "the run ended before the test could kill it mid-epoch"
    killed = only_run_dir(tmp_path / "killed")
    assert len(metrics_without_seconds(killed)) == 2  # header + epoch 1 only

    resumed = aicoss("train", "--resume", killed)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert straight_proc.wait(timeout=300) == 0, log.read_text()
    straight = only_run_dir(tmp_path / "straight")
    a, b = weights(straight / "last.safetensors"), weights(killed / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    a, b = train_state_tensors(straight), train_state_tensors(killed)
    emas = [k for k in a if k.startswith("extra.ema.")]
    assert emas and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_without_seconds(killed) == metrics_without_seconds(straight)
    assert (killed / "submission.csv").read_text() == (straight / "submission.csv").read_text()


def test_resume_refuses_a_changed_recipe_unless_forced(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=1)
    assert run_cli("train", recipe, "--out", tmp_path).code == 0
    run = only_run_dir(tmp_path)
    before = (run / "last.safetensors").read_bytes()
    changed = run_cli("train", recipe, "--resume", run, "--set", "optim.lr=1e-2")
    assert changed.code == 2 and "[optim] lr: 0.003 -> 0.01" in changed.stderr and "--force" in changed.stderr
    assert (run / "last.safetensors").read_bytes() == before
    forced = run_cli("train", recipe, "--resume", run, "--set", "optim.epochs=2", "--force")
    assert forced.code == 0, forced.stderr
    assert "[optim] epochs: 1 -> 2" in forced.stdout + forced.stderr
    assert len(metrics_without_seconds(run)) == 3  # the run went on to epoch 2


def test_resume_of_a_folder_that_is_not_a_run(run_cli, tmp_path):
    result = run_cli("train", "--resume", tmp_path)
    assert result.code == 2 and "not an aicoss run folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_state_and_exits_cleanly(demo_root, write_recipe, tmp_path):
    recipe = exact_recipe(write_recipe, demo_root, epochs=3)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "aicoss_cli", "train", str(recipe), "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        runs = list(tmp_path.glob("*/*"))
        progress = state_progress(runs[0]) if runs else None
        if progress and progress["global_step"] >= 1:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    progress = state_progress(only_run_dir(tmp_path))
    assert progress["global_step"] >= 1 and progress["epoch"] < 3


@pytest.mark.parametrize("existing", ["runs"])
def test_a_new_run_never_reuses_an_existing_folder(run_cli, demo_root, write_recipe, tmp_path, existing):
    recipe = write_recipe(demo_root, epochs=1)
    assert run_cli("train", recipe, "--out", tmp_path / existing).code == 0
    assert run_cli("train", recipe, "--out", tmp_path / existing).code == 0
    runs = sorted(p for p in (tmp_path / existing / "tiny").iterdir())
    assert len(runs) == 2 and all((p / "best.safetensors").is_file() for p in runs)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    import aicoss_cli.losses.registry as losses

    real_build = losses.build_loss
    train_calls = {"n": 0}

    def nan_at_epoch_2_step_3(name, **params):
        loss = real_build(name, **params)
        forward = loss.forward

        def poisoned(logits, targets):
            value = forward(logits, targets)
            if logits.requires_grad:  # training steps only, not validation
                train_calls["n"] += 1
                if train_calls["n"] == 6 + 3:  # 192 train images / batch 32 = 6 steps per epoch
                    return value * float("nan")
            return value

        loss.forward = poisoned
        return loss

    monkeypatch.setattr(losses, "build_loss", nan_at_epoch_2_step_3)
    recipe = write_recipe(demo_root, epochs=3)
    result = run_cli("train", recipe, "--out", tmp_path)
    assert result.code == 1
    assert "non-finite loss at epoch 2, step 3" in result.stderr and "Traceback" not in result.stderr
    run = only_run_dir(tmp_path)
    assert len(metrics_without_seconds(run)) == 2  # header + epoch 1: the bad epoch wrote nothing
    kept = weights(run / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert state_progress(run)["epoch"] == 1  # the resumable state is the end of epoch 1

    monkeypatch.setattr(losses, "build_loss", real_build)
    resumed = run_cli("train", "--resume", run)
    assert resumed.code == 0, resumed.stderr
    assert len(metrics_without_seconds(run)) == 4


def test_an_image_that_breaks_during_training_stops_cleanly_and_resumes(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    import aicoss_cli.data.loading as data

    real_load = data.decode_image
    seen = {"n": 0, "bad": None}

    def breaks_once(path, size, *exif_transpose):
        seen["n"] += 1
        if seen["n"] == 2 * 32 + 5:  # an image of epoch 1, step 3 (passed the up-front check, then went bad)
            seen["bad"] = path
            raise OSError("image file is truncated")
        return real_load(path, size, *exif_transpose)

    monkeypatch.setattr(data, "decode_image", breaks_once)
    recipe = write_recipe(demo_root, epochs=2)
    result = run_cli("train", recipe, "--out", tmp_path)
    run = only_run_dir(tmp_path)
    assert result.code == 2, result.stderr
    message = " ".join(result.stderr.split())  # Rich may wrap the long line
    assert seen["bad"] in message and "cannot decode image" in message
    assert "epoch 1, step 2" in message and f"aicoss train --resume {run}" in message
    assert "Traceback" not in message
    progress = state_progress(run)
    assert (progress["epoch"], progress["step"]) == (0, 2)

    monkeypatch.setattr(data, "decode_image", real_load)
    resumed = run_cli("train", "--resume", run)
    assert resumed.code == 0, resumed.stderr
    assert len(metrics_without_seconds(run)) == 3 and (run / "submission.csv").is_file()


def _interrupted_run(run_cli, recipe, out, monkeypatch) -> Path:
    """A run stopped (as by Ctrl-C) after its first optimizer step of epoch 1."""
    from aicoss_cli.train.step import TrainStep

    real = TrainStep.optimize

    def stop_after_first_step(self, lr, global_step):
        real(self, lr, global_step)
        if global_step == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TrainStep, "optimize", stop_after_first_step)
    result = run_cli("train", recipe, "--out", out)
    monkeypatch.setattr(TrainStep, "optimize", real)
    assert result.code == 130, result.stderr
    return only_run_dir(out)


def test_resume_with_data_in_a_new_place_uses_it(run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    import shutil

    old = tmp_path / "old_data"
    shutil.copytree(demo_root, old)
    run = _interrupted_run(run_cli, write_recipe(old, epochs=2), tmp_path / "runs", monkeypatch)
    new = tmp_path / "moved_data"
    old.rename(new)
    lost = run_cli("train", "--resume", run)
    assert lost.code == 2 and "old_data: data folder not found" in lost.stderr
    resumed = run_cli("train", "--resume", run, "--data", new)
    assert resumed.code == 0, resumed.stderr
    assert len(metrics_without_seconds(run)) == 3 and (run / "submission.csv").is_file()
    from aicoss_cli.recipe import recipe_from_toml

    assert recipe_from_toml((run / "recipe.toml").read_text(), "run").data.root == str(new)


def test_resume_on_data_with_another_split_is_refused(run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    import shutil

    run = _interrupted_run(run_cli, write_recipe(demo_root, epochs=2), tmp_path / "runs", monkeypatch)
    before = (run / "train_state.safetensors").read_bytes()
    other = tmp_path / "other"
    shutil.copytree(demo_root, other)
    lines = (other / "train.csv").read_text().splitlines()
    (other / "train.csv").write_text("\n".join(lines[:-10]) + "\n")  # ten rows fewer: another split
    result = run_cli("train", "--resume", run, "--data", other)
    assert result.code == 2 and "split differs" in result.stderr, result.stderr
    assert (run / "train_state.safetensors").read_bytes() == before


def test_resume_with_out_continues_in_a_new_folder_and_leaves_the_run_as_it_was(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    run = _interrupted_run(run_cli, write_recipe(demo_root, epochs=2), tmp_path / "runs", monkeypatch)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = run_cli("train", "--resume", run, "--out", tmp_path / "forks")
    assert result.code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    fork = only_run_dir(tmp_path / "forks")
    assert len(metrics_without_seconds(fork)) == 3 and (fork / "submission.csv").is_file()


def test_resume_of_a_finished_run_says_so_and_touches_nothing(run_cli, demo_root, write_recipe, tmp_path):
    assert run_cli("train", write_recipe(demo_root, epochs=1), "--out", tmp_path).code == 0
    run = only_run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = run_cli("train", "--resume", run)
    assert result.code == 0 and "already complete" in result.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("damage", ["progress key removed", "progress not JSON", "step negative", "optimizer gone"])
def test_a_damaged_training_state_is_a_one_line_error(run_cli, demo_root, write_recipe, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    assert run_cli("train", write_recipe(demo_root, epochs=2), "--out", tmp_path, "--set", "optim.epochs=1").code == 0
    run = only_run_dir(tmp_path)
    path = run / "train_state.safetensors"
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(size))["__metadata__"]
    tensors = load_file(str(path))
    progress = json.loads(meta["progress"])
    if damage == "progress key removed":
        del meta["progress"]
    elif damage == "progress not JSON":
        meta["progress"] = "{not json"
    elif damage == "step negative":
        meta["progress"] = json.dumps(dict(progress, epoch=0, step=-3))
    else:
        meta["optimizer"] = "[]"
    save_file(tensors, str(path), metadata=meta)
    result = run_cli("train", "--resume", run, "--set", "optim.epochs=2", "--force")
    assert result.code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train_state.safetensors" in lines[0] and "damaged" in lines[0], result.stderr


def test_a_second_train_on_the_same_run_folder_is_refused_and_a_stale_lock_is_taken_over(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    run = _interrupted_run(run_cli, write_recipe(demo_root, epochs=2), tmp_path / "runs", monkeypatch)
    assert not (run / ".aicoss.lock").exists()  # released when the run stopped
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".aicoss.lock").write_text(json.dumps({"pid": other.pid}))
        before = (run / "train_state.safetensors").read_bytes()
        busy = run_cli("train", "--resume", run)
        assert busy.code == 2 and f"pid {other.pid}" in busy.stderr, busy.stderr
        assert (run / "train_state.safetensors").read_bytes() == before
    finally:
        other.kill()
        other.wait()
    resumed = run_cli("train", "--resume", run)  # the process that held it is gone: the lock is stale
    assert resumed.code == 0, resumed.stderr
    assert not (run / ".aicoss.lock").exists()
