"""aicoss tune across sessions and stops: a trial the data refuses is failed with its reason and the
study goes on, what the data refuses for sure is refused before trial 0, the summaries are written
whenever a study stops, a resumed seeded study draws new values, and a storage that cannot be
made is one line."""

from __future__ import annotations

import math

import optuna  # the tune extra, which `make install` installs
import pytest

from aicoss_cli.base.errors import UserError

from helpers import assert_one_line_error, read_trials, tune_recipe

LR = """
[optim.lr]
low = 1e-4
high = 1e-1
log = true
"""


def fake_training(monkeypatch, refuse=lambda recipe: None):
    """Trials that take no time: a run's val mAP is a smooth function of its lr (best at 3e-3);
    `refuse(recipe)` may raise what the data would raise for that trial."""
    from aicoss_cli.train.trainer import RunResult, Trainer

    def run(self):
        refuse(self.recipe)
        value = 1 - abs(math.log10(self.recipe.optim.lr) + 2.5) / 10
        return RunResult(run_dir=self.out, rows=[], best_epoch=1, best_map=value, skipped_classes=0)

    monkeypatch.setattr(Trainer, "run", run)


def test_a_trial_the_data_refuses_is_failed_with_its_reason_and_the_study_goes_on(run_cli, demo_root, tmp_path,
                                                                                   monkeypatch):
    def refuse(recipe):
        if recipe.optim.lr >= 5:
            raise UserError(f"{recipe.data.root}/train.csv: 3 of 240 images cannot be used (first: train/x.jpg: "
                            "truncated JPEG); replace or remove those rows")

    fake_training(monkeypatch, refuse)
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nlow = 5.0\nhigh = 10.0\n")  # trial 0 keeps the recipe's 3e-3; the others are refused
    out = tmp_path / "tune"
    result = run_cli("tune", tune_recipe(tmp_path, demo_root, epochs=1), "--data", demo_root, "--space", space, "--trials", "3",
                     "--epochs", "1", "--out", out, "--study", "s")
    assert result.code == 0, result.stderr
    trials = read_trials(out / "s")
    assert [t["state"] for t in trials] == ["complete", "failed", "failed"]
    assert all("truncated JPEG" in t["note"] for t in trials[1:])
    assert "trial 1 failed" in result.stderr and "truncated JPEG" in result.stderr
    assert (out / "s" / "best.toml").is_file() and (out / "s" / "trials.png").is_file()


@pytest.mark.parametrize("arch, space, needles", [
    ("tiny_convnet", "[optim.batch_size]\nchoices = [16, 512]\n", ["[optim.batch_size]", "512", "192 images"]),
    ("tiny_convnet", "[optim.batch_size]\nlow = 8\nhigh = 400\n", ["[optim.batch_size]", "400", "192 images"]),
    ("tresnet_xl_mldecoder", "[model.img_size]\nchoices = [32, 34]\n", ["[model.img_size]", "34", "tresnet_xl"]),
])
def test_what_the_data_or_the_arch_refuses_for_sure_is_refused_before_trial_0(run_cli, demo_root, tmp_path,
                                                                             monkeypatch, arch, space, needles):
    fake_training(monkeypatch)
    (tmp_path / "space.toml").write_text(space)
    out = tmp_path / "tune"
    result = run_cli("tune", tune_recipe(tmp_path, demo_root, epochs=1, arch=arch), "--data", demo_root, "--space",
                     tmp_path / "space.toml", "--trials", "2", "--out", out, "--study", "s")
    assert_one_line_error(result, *needles)
    assert not (out / "tune.db").exists() or optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'tune.db'}").trials == []


def test_ctrl_c_in_the_first_trial_still_writes_the_summaries(run_cli, demo_root, tmp_path, monkeypatch):
    def refuse(recipe):
        raise KeyboardInterrupt

    fake_training(monkeypatch, refuse)
    (tmp_path / "space.toml").write_text(LR)
    out = tmp_path / "tune"
    result = run_cli("tune", tune_recipe(tmp_path, demo_root, epochs=1), "--data", demo_root, "--space", tmp_path / "space.toml",
                     "--trials", "2", "--out", out, "--study", "s")
    assert result.code == 130 and result.stderr.strip().splitlines()[-1].startswith("stopped: interrupted")
    assert [t["state"] for t in read_trials(out / "s")] == ["interrupted"]
    assert (out / "s" / "trials.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "s" / "best.toml").exists()  # no trial completed: no best recipe


def test_a_study_stopped_by_a_full_disk_keeps_its_summaries(run_cli, demo_root, tmp_path, monkeypatch):
    from aicoss_cli.train import run_dir as run_folder

    def refuse(recipe):
        if recipe.optim.lr >= 5:
            raise run_folder.write_failed(tmp_path, OSError(28, "No space left on device", str(tmp_path / "x")))

    fake_training(monkeypatch, refuse)
    (tmp_path / "space.toml").write_text("[optim.lr]\nlow = 5.0\nhigh = 10.0\n")
    out = tmp_path / "tune"
    result = run_cli("tune", tune_recipe(tmp_path, demo_root, epochs=1), "--data", demo_root, "--space", tmp_path / "space.toml",
                     "--trials", "3", "--out", out, "--study", "s")
    assert result.code == 1 and result.stderr.strip().splitlines()[-1].startswith("stopped: writing to")
    assert [t["state"] for t in read_trials(out / "s")] == ["complete", "failed"]
    assert (out / "s" / "best.toml").is_file()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_three_sessions_of_a_seeded_study_never_repeat_a_value(run_cli, demo_root, tmp_path, monkeypatch, sampler):
    fake_training(monkeypatch)
    space = tmp_path / "space.toml"
    # a log-scale weight decay the recipe's 0.0 cannot sit on: no trial 0 of the recipe, every trial drawn
    space.write_text(f"{LR}\n[optim.weight_decay]\nlow = 1e-6\nhigh = 1e-2\nlog = true\n\n"
                     f"[tune]\nsampler = \"{sampler}\"\nseed = 7\n")
    recipe = tune_recipe(tmp_path, demo_root, epochs=1)
    recipe.write_text(recipe.read_text().replace("weight_decay = 1e-4", "weight_decay = 0.0"))
    out = tmp_path / "tune"
    for session in (1, 2, 3):
        result = run_cli("tune", recipe, "--data", demo_root, "--space", space, "--trials", str(session), "--out", out,
                         "--study", "s")
        assert result.code == 0, result.stderr
    values = [(t["params"]["optim.lr"], t["params"]["optim.weight_decay"]) for t in read_trials(out / "s")]
    assert len(values) == 3 and len(set(values)) == 3, values


def test_a_storage_that_cannot_be_made_is_one_line(run_cli, demo_root, tmp_path):
    (tmp_path / "space.toml").write_text(LR)
    result = run_cli("tune", tune_recipe(tmp_path, demo_root, epochs=1), "--data", demo_root, "--space", tmp_path / "space.toml",
                     "--trials", "1", "--out", tmp_path / "tune", "--storage", "sqlite:////proc/nope/tune.db")
    assert_one_line_error(result, "--storage sqlite:////proc/nope/tune.db", "/proc/nope")
