"""aicoss tune: trials are normal run folders, the median pruner stops bad trials, a study resumes
without running its finished trials again, the best recipe trains, bad search spaces are one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import optuna  # the tune extra, which `make install` installs
import pytest

from helpers import ROOT, assert_one_line_error, read_metrics, read_trials, tune_recipe

LR_ONLY = """
[optim.lr]
low = 1e-3
high = 1e-2
log = true
"""

# every drawn lr is hopeless; the recipe's own (trial 0, lr 3e-3) is not
HOPELESS_LR = """
[optim.lr]
low = 1e-9
high = 1e-8
log = true

[tune]
startup_trials = 1
seed = 0
"""


def run_folders(study_dir: Path) -> list[Path]:
    return sorted(p.parent for p in study_dir.glob("*/*/recipe.toml"))


def load_study(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'tune.db'}")


@pytest.mark.slow  # two tune runs, 3 trials with augmentation: 7-18 s on 2 shared cores
def test_three_trials_are_run_folders_and_the_best_recipe_validates(run_cli, demo_root, tmp_path):
    recipe = tune_recipe(tmp_path, demo_root, policy="weak")
    out = tmp_path / "tune"
    args = ("tune", recipe, "--data", demo_root, "--epochs", "1", "--out", out, "--study", "s")
    first = run_cli(*args, "--trials", "2")
    assert first.code == 0, first.stderr
    study_dir = out / "s"
    before = {p: (p / "metrics.csv").read_bytes() for p in run_folders(study_dir)}
    assert len(before) == 2

    result = run_cli(*args, "--trials", "3")  # the study holds 2 finished trials: one more runs
    assert result.code == 0, result.stderr
    assert "2 of 3 trials finished" in result.stderr
    folders = run_folders(study_dir)
    assert len(folders) == 3 and all(before[p] == (p / "metrics.csv").read_bytes() for p in before)
    trials = read_trials(study_dir)
    assert [t["trial"] for t in trials] == ["0", "1", "2"] and {t["state"] for t in trials} == {"complete"}

    for t in trials:  # each trial: a run folder trained with its values, scored by its own metrics.csv
        trained = tomllib.loads((Path(t["run_dir"]) / "recipe.toml").read_text())
        for key, value in t["params"].items():
            section, name = key.split(".")
            assert trained[section][name] == pytest.approx(value), key
        assert trained["optim"]["epochs"] == 1 and (Path(t["run_dir"]) / "submission.csv").is_file()
        best_map = max(float(r["val_map"]) for r in read_metrics(t["run_dir"]))
        assert float(t["val_map"]) == pytest.approx(best_map, abs=1e-5)
    # trial 0 is the recipe as written
    assert trials[0]["params"] == {"optim.lr": 3e-3, "optim.weight_decay": 1e-4, "augment.policy": "weak",
                                   "augment.magnitude": 9, "augment.num_ops": 2, "augment.cutout_factor": 0.5}
    assert "0 (recipe)" in result.stdout

    best = max(trials, key=lambda t: float(t["val_map"]))
    assert f"best: trial {best['trial']}, val mAP {float(best['val_map']):.4f}" in result.stdout
    best_toml = study_dir / "best.toml"
    written = tomllib.loads(best_toml.read_text())
    for key, value in best["params"].items():
        section, name = key.split(".")
        assert written[section][name] == pytest.approx(value), key
    assert written["optim"]["epochs"] == 2  # the recipe's own, not the trials' --epochs
    assert written["name"] == "tiny_tuned"
    check = run_cli("validate", best_toml, "--data", demo_root)
    assert check.code == 0, check.stderr
    assert (study_dir / "trials.png").read_bytes().startswith(b"\x89PNG")


def test_the_median_pruner_stops_trials_of_a_hopeless_space(run_cli, demo_root, tmp_path):
    recipe = tune_recipe(tmp_path, demo_root, min_lr=0.0)
    space = tmp_path / "space.toml"
    space.write_text(HOPELESS_LR)
    out = tmp_path / "tune"
    result = run_cli("tune", recipe, "--data", demo_root, "--space", space, "--trials", "2", "--epochs", "2",
                     "--out", out, "--study", "s")
    assert result.code == 0, result.stderr
    first, second = read_trials(out / "s")
    assert first["state"] == "complete" and first["params"] == {"optim.lr": 3e-3}
    assert second["state"] == "pruned" and second["params"]["optim.lr"] < 1e-8
    # stopped after its first epoch, below trial 0's first epoch, and still a normal run folder
    assert len(read_metrics(second["run_dir"])) == 1 and (Path(second["run_dir"]) / "submission.csv").is_file()
    assert float(second["val_map"]) < float(read_metrics(first["run_dir"])[0]["val_map"])
    assert "pruned after epoch 1" in result.stderr and "pruned" in result.stdout
    assert tomllib.loads((out / "s" / "best.toml").read_text())["optim"]["lr"] == 3e-3


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_repeating_finished_trials(run_cli, demo_root, tmp_path):
    recipe = tune_recipe(tmp_path, demo_root)
    space = tmp_path / "space.toml"
    space.write_text(LR_ONLY)
    out = tmp_path / "tune"
    args = ["tune", recipe, "--data", demo_root, "--space", space, "--trials", "3", "--epochs", "2", "--out", out,
            "--study", "s"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "aicoss_cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(run_folders(out / "s")) >= 2:  # trial 0 is done, trial 1 has started
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: interrupted") and "1 finished trial" in last and "Traceback" not in stderr
    study = load_study(out, "s")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    first = study.trials[0]
    first_metrics = (Path(first.user_attrs["run_dir"]) / "metrics.csv").read_bytes()

    result = run_cli(*args)
    assert result.code == 0, result.stderr
    study = load_study(out, "s")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].value == first.value and study.trials[0].params == first.params
    assert (Path(first.user_attrs["run_dir"]) / "metrics.csv").read_bytes() == first_metrics
    assert len(run_folders(out / "s")) == 4  # trial 0's, the interrupted one's, and two new ones

    again = run_cli(*args)  # the study is complete: nothing runs
    assert again.code == 0 and "nothing to run" in again.stderr and len(run_folders(out / "s")) == 4


def test_resuming_a_study_with_another_space_is_refused(run_cli, demo_root, tmp_path):
    recipe = tune_recipe(tmp_path, demo_root)
    space = tmp_path / "space.toml"
    space.write_text(LR_ONLY)
    out = tmp_path / "tune"
    args = ("tune", recipe, "--data", demo_root, "--trials", "1", "--epochs", "1", "--out", out, "--study", "s")
    assert run_cli(*args, "--space", space).code == 0
    space.write_text(LR_ONLY.replace("high = 1e-2", "high = 2e-2"))
    result = run_cli(*args, "--space", space)
    assert_one_line_error(result, "study 's'", "search space", "--study")
    assert len(run_folders(out / "s")) == 1


BAD_SPACES = {
    "unknown key": ("[optim.lrr]\nlow = 1e-4\nhigh = 1e-2\n", "did you mean 'optim.lr'"),
    "unknown section": ("[optimizer.lr]\nlow = 1e-4\nhigh = 1e-2\n", "unknown section [optimizer]"),
    "empty range": ("[optim.lr]\nlow = 1e-2\nhigh = 1e-4\n", "empty range"),
    "no high": ("[optim.lr]\nlow = 1e-4\n", "no high"),
    "not a table": ("[optim]\nlr = 1e-3\n", "must be a table"),
    "rejected bound": ("[augment.magnitude]\nlow = 1\nhigh = 40\n", "[augment.magnitude] high 40"),
    "rejected choice": ('[augment.policy]\nchoices = ["weak", "heavy"]\n', "heavy"),
    "empty choices": ("[augment.policy]\nchoices = []\n", "choices is empty"),
    "zero on a log scale": ("[optim.weight_decay]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "low > 0"),
    "NaN bound": ("[optim.lr]\nlow = nan\nhigh = 1e-2\n", "finite"),
    "fraction for an integer": ("[augment.num_ops]\nlow = 0.5\nhigh = 3\n", "integer"),
    "range of words": ("[augment.policy]\nlow = 1\nhigh = 2\n", "choices = [...]"),
    "the split": ("[data.split_seed]\nchoices = [1, 2]\n", "cannot be searched"),
    "epochs": ("[optim.epochs]\nchoices = [1, 2]\n", "--epochs"),
    "a loss parameter of another loss": ("[loss.gamma_neg]\nlow = 0\nhigh = 4\n", "does not apply"),
    "condition on nothing": ('[augment.magnitude]\nlow = 1\nhigh = 9\nwhen = { "augment.policyy" = "weak" }\n',
                             "does not search"),
    "unknown tune key": ("[tune]\nstartup = 2\n[optim.lr]\nlow = 1e-4\nhigh = 1e-2\n", "did you mean"),
    "unknown entry key": ("[optim.lr]\nlow = 1e-4\nhigh = 1e-2\nlogscale = true\n", "unknown key 'logscale'"),
    "TOML syntax": ("[optim.lr\nlow = 1\n", "TOML syntax error"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_a_bad_search_space_is_one_line_before_any_trial(run_cli, demo_root, tmp_path, case):
    text, needle = BAD_SPACES[case]
    space = tmp_path / "space.toml"
    space.write_text(text)
    out = tmp_path / "tune"
    result = run_cli("tune", tune_recipe(tmp_path, demo_root), "--data", demo_root, "--space", space,
                     "--trials", "2", "--out", out)
    assert_one_line_error(result, str(space), needle)
    assert not out.exists()  # no storage, no run folder


def test_a_missing_space_file_and_a_bad_study_name_are_one_line(run_cli, demo_root, tmp_path):
    recipe = tune_recipe(tmp_path, demo_root)
    out = tmp_path / "tune"
    missing = run_cli("tune", recipe, "--data", demo_root, "--space", tmp_path / "nope.toml", "--out", out)
    assert_one_line_error(missing, "nope.toml", "not found")
    bad_name = run_cli("tune", recipe, "--data", demo_root, "--study", "../x", "--out", out)
    assert_one_line_error(bad_name, "--study")
    assert not out.exists()


def test_tune_without_optuna_names_the_extra(run_cli, demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    result = run_cli("tune", tune_recipe(tmp_path, demo_root), "--data", demo_root, "--out", tmp_path / "t")
    assert_one_line_error(result, "pip install 'aicoss[tune]'")


@pytest.mark.parametrize("stop", ["non-finite loss", "full disk"])
def test_a_diverged_trial_counts_as_pruned_and_a_full_disk_stops_the_study(run_cli, demo_root, tmp_path,
                                                                            monkeypatch, stop):
    from aicoss_cli.train import run_dir as run_folder
    from aicoss_cli.train.trainer import Trainer

    run = Trainer.run

    def run_or_stop(self):  # the engine's own stop for the trial with the huge lr
        if self.recipe.optim.lr < 1:
            return run(self)
        if stop == "non-finite loss":
            raise run_folder.nonfinite_loss(tmp_path, 0, 3, 3)
        raise run_folder.write_failed(tmp_path, OSError(28, "No space left on device", str(tmp_path / "x")))

    monkeypatch.setattr(Trainer, "run", run_or_stop)
    recipe = tune_recipe(tmp_path, demo_root)
    space = tmp_path / "space.toml"
    space.write_text("[optim.lr]\nlow = 5.0\nhigh = 10.0\n")  # trial 0 keeps the recipe's 3e-3; trial 1 is huge
    out = tmp_path / "tune"
    result = run_cli("tune", recipe, "--data", demo_root, "--space", space, "--trials", "2", "--epochs", "1",
                     "--out", out, "--study", "s")
    study = load_study(out, "s")
    assert study.trials[0].state.name == "COMPLETE" and study.trials[1].params["optim.lr"] >= 5.0
    if stop == "non-finite loss":  # a bad outcome of these values: the study goes on
        assert result.code == 0, result.stderr
        assert study.trials[1].state.name == "PRUNED" and read_trials(out / "s")[1]["state"] == "diverged"
        assert "diverged" in result.stdout and "best: trial 0" in result.stdout
    else:  # not the values' fault: the study stops, the trial is failed, not counted
        assert result.code == 1 and result.stderr.strip().splitlines()[-1].startswith("stopped: writing to")
        assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
