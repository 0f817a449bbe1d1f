"""aicoss tune: trials are normal run folders, the median pruner stops bad trials, a study resumes
without running its finished trials again, the best recipe trains, bad search spaces are one line."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import optuna  # the tune extra, which `make install` installs
import pytest

from helpers import ROOT, TINY_RECIPE, assert_one_line_error

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


def tiny_recipe(tmp_path: Path, root: Path, *, policy: str = "none", min_lr: float = 1e-4) -> Path:
    """The tests' tiny recipe with a weight decay a log scale can hold, so trial 0 is the recipe."""
    path = tmp_path / "tiny.toml"
    text = TINY_RECIPE.format(arch="tiny_convnet", loss="bce", epochs=2, policy=policy, root=root)
    path.write_text(text.replace("weight_decay = 0.0", "weight_decay = 1e-4").replace("min_lr = 1e-4",
                                                                                      f"min_lr = {min_lr}"))
    return path


def read_trials(study_dir: Path) -> list[dict]:
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["params"] = json.loads(r["params"])
    return rows


def metrics(run_dir: str | Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_folders(study_dir: Path) -> list[Path]:
    return sorted(p.parent for p in study_dir.glob("*/*/recipe.toml"))


def load_study(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'tune.db'}")


@pytest.mark.slow  # two tune runs, 3 trials with augmentation: 7-18 s on 2 shared cores
def test_three_trials_are_run_folders_and_the_best_recipe_validates(run_cli, demo_root, tmp_path):
    recipe = tiny_recipe(tmp_path, demo_root, policy="weak")
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
        assert float(t["val_map"]) == pytest.approx(max(float(r["val_map"]) for r in metrics(t["run_dir"])), abs=1e-5)
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
    recipe = tiny_recipe(tmp_path, demo_root, min_lr=0.0)
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
    assert len(metrics(second["run_dir"])) == 1 and (Path(second["run_dir"]) / "submission.csv").is_file()
    assert float(second["val_map"]) < float(metrics(first["run_dir"])[0]["val_map"])
    assert "pruned after epoch 1" in result.stderr and "pruned" in result.stdout
    assert tomllib.loads((out / "s" / "best.toml").read_text())["optim"]["lr"] == 3e-3


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_repeating_finished_trials(run_cli, demo_root, tmp_path):
    recipe = tiny_recipe(tmp_path, demo_root)
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


def test_a_trial_whose_process_died_is_marked_failed_and_others_are_left_alone(tmp_path):
    from aicoss_cli.tune.study import mark_dead_trials

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(study_name="s", storage=storage)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    here = socket.gethostname()
    for host, pid in ((here, gone.pid), ("another-machine", gone.pid), (here, os.getpid())):
        trial = study.ask()
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
    assert mark_dead_trials(study, storage) == [0]
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING", "RUNNING"]


def test_resuming_a_study_with_another_space_is_refused(run_cli, demo_root, tmp_path):
    recipe = tiny_recipe(tmp_path, demo_root)
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
    result = run_cli("tune", tiny_recipe(tmp_path, demo_root), "--data", demo_root, "--space", space,
                     "--trials", "2", "--out", out)
    assert_one_line_error(result, str(space), needle)
    assert not out.exists()  # no storage, no run folder


def test_a_missing_space_file_and_a_bad_study_name_are_one_line(run_cli, demo_root, tmp_path):
    recipe = tiny_recipe(tmp_path, demo_root)
    out = tmp_path / "tune"
    missing = run_cli("tune", recipe, "--data", demo_root, "--space", tmp_path / "nope.toml", "--out", out)
    assert_one_line_error(missing, "nope.toml", "not found")
    bad_name = run_cli("tune", recipe, "--data", demo_root, "--study", "../x", "--out", out)
    assert_one_line_error(bad_name, "--study")
    assert not out.exists()


def test_tune_without_optuna_names_the_extra(run_cli, demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    result = run_cli("tune", tiny_recipe(tmp_path, demo_root), "--data", demo_root, "--out", tmp_path / "t")
    assert_one_line_error(result, "pip install 'aicoss[tune]'")


def test_the_default_space_searches_the_loss_only_where_labels_are_missing(demo_root, demo_root_partial, tmp_path):
    from aicoss_cli.tune.space import TrialRecipes, load_space

    recipe = tiny_recipe(tmp_path, demo_root)
    for root, epochs, partial in ((demo_root, 1, False), (demo_root_partial, 4, True)):
        recipes = TrialRecipes(recipe, data=root, epochs=epochs)
        recipes.inspect_data()
        space = {p.key: p for p in load_space(None, recipes).params}
        assert ("loss.name" in space) is partial
        assert ("optim.warmup_epochs" in space) is (epochs >= 2)
        lr = space["optim.lr"]
        assert (lr.low, lr.high, lr.log) == (3e-4, 3e-2, True)  # a decade either side of the recipe's 3e-3
    assert space["optim.warmup_epochs"].high == 2
    assert dict(space["loss.partial_mode"].when) == {"loss.name": ("partial_selective",)}


def test_a_space_file_extends_the_default_and_changes_one_entry(demo_root, tmp_path):
    from aicoss_cli.tune.space import TrialRecipes, load_space

    space = tmp_path / "space.toml"
    space.write_text('extends = "default"\n[augment.policy]\nchoices = ["none", "weak"]\n'
                     '[optim.clip_grad_norm]\nchoices = [1.0, 5.0]\n[tune]\nsampler = "random"\nmin_epochs = 2\n')
    recipes = TrialRecipes(tiny_recipe(tmp_path, demo_root), data=demo_root, epochs=3)
    recipes.inspect_data()
    loaded = load_space(space, recipes)
    params = {p.key: p for p in loaded.params}
    assert params["augment.policy"].choices == ("none", "weak")
    assert "optim.lr" in params and params["optim.clip_grad_norm"].kind == "categorical"
    assert loaded.settings.sampler == "random" and loaded.min_epochs == 2


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


def test_the_readme_space_example_is_accepted(demo_root, tmp_path):
    from aicoss_cli.tune.space import TrialRecipes, load_space

    readme = (ROOT / "README.md").read_text()
    block = readme.split("**`--space SPACE.toml`**", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    space = tmp_path / "space.toml"
    space.write_text(block)
    recipes = TrialRecipes(ROOT / "recipes" / "starter.toml", data=demo_root, epochs=3)
    recipes.inspect_data()
    loaded = load_space(space, recipes)
    keys = [p.key for p in loaded.params]
    assert "optim.weight_decay" in keys and "model.arch" in keys and loaded.min_epochs == 2


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
    recipe = tiny_recipe(tmp_path, demo_root)
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


@pytest.mark.slow
def test_the_readme_python_api_example_runs(demo_root, tmp_path, monkeypatch, capsys):
    """The README's Python API block as a user would paste it, on the tests' small data, with one
    epoch and two trials."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shorter = {'"data/demo"': repr(str(demo_root)), "trials=20": "trials=2", "epochs=3)": "epochs=1)",
               '["optim.epochs=3"]': '["optim.epochs=1", "optim.warmup_epochs=0"]'}
    for old, new in shorter.items():
        assert old in block, old
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    exec(compile(block, "README.md (Python API)", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].endswith(str(Path("runs/tune/starter-demo/best.toml")))
    assert (tmp_path / "val.csv").is_file() and (tmp_path / "val_labels.csv").is_file()
    assert len(list((tmp_path / "runs" / "demo").glob("*/best.safetensors"))) == 1


def test_tune_takes_a_bundled_recipe_by_name_as_train_does(demo_root):
    from aicoss_cli.recipe import bundled_recipes
    from aicoss_cli.tune import TrialRecipes

    recipes = TrialRecipes("starter", data=demo_root, epochs=1)
    assert recipes.path == bundled_recipes() / "starter.toml" and recipes.base.name == "starter"
