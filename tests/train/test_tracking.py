"""Experiment tracking: fake epochs through `open_trackers`, read back from TensorBoard's event
files and from the MLflow SQLite store."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

from aicoss_cli.base.errors import UserError
from aicoss_cli.train.tracking import open_trackers, recipe_params

RECIPE_TOML = 'name = "tiny"\n\n[optim]\nlr = 0.003\nepochs = 3\n'
PARAMS = {"name": "tiny", "optim.lr": 0.003, "optim.epochs": 3, "model.pretrained": False, "data.root": "data/demo"}
CLASSES = {"digit_0": 0.5, "a,b 🙂": 0.25, "unseen": math.nan}


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # nothing may land in the current folder either
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "runs" / "tiny" / "20260101T000000Z"
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(RECIPE_TOML)
    (folder / "metrics.csv").write_text("epoch,lr,train_loss,val_loss,val_map,seconds\n1,0.003,0.5,0.6,0.3,1.0\n")
    return folder


def _open(run_dir: Path, warnings: list[str], resumed: bool = False, names=("tensorboard", "mlflow")):
    return open_trackers(list(names), run_dir, run_dir.parent.parent, RECIPE_TOML, PARAMS, resumed, warnings.append)


def _epoch(trackers, epoch: int, per_class=None) -> None:
    """Steps 10 per epoch, a log every 5 steps; the values encode epoch and step."""
    for step in (10 * epoch - 5, 10 * epoch):
        trackers.log_train(step, {"loss": 1.0 / step, "lr": 0.001 * epoch, "img_per_s": 100.0 + step})
    trackers.log_epoch(epoch, 10 * epoch, {"train_loss": 0.5 / epoch, "val_loss": 0.6 / epoch, "val_map": 0.2 + 0.1 * epoch},
                       per_class_ap=per_class)


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def _mlflow(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client, client.search_runs([experiment.experiment_id])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_both_backends_hold_every_logged_value(run_dir):
    warnings: list[str] = []
    trackers = _open(run_dir, warnings)
    assert trackers.names == ["tensorboard", "mlflow"]
    _epoch(trackers, 1, CLASSES)
    _epoch(trackers, 2, {"digit_0": 0.75, "a,b 🙂": 0.5})
    trackers.close("finished", artifacts=[run_dir / "recipe.toml", run_dir / "metrics.csv", run_dir / "curves.png"])
    assert warnings == []

    scalars, acc = _scalars(run_dir)
    approx = lambda pairs: [(s, pytest.approx(v, rel=1e-6)) for s, v in pairs]  # event files hold float32
    assert scalars["train/loss"] == approx([(5, 1 / 5), (10, 1 / 10), (15, 1 / 15), (20, 1 / 20)])
    assert scalars["train/lr"] == approx([(5, 0.001), (10, 0.001), (15, 0.002), (20, 0.002)])
    assert scalars["train/img_per_s"] == approx([(5, 105), (10, 110), (15, 115), (20, 120)])
    assert scalars["val/loss"] == approx([(10, 0.6), (20, 0.3)])
    assert scalars["val/mAP"] == approx([(10, 0.3), (20, 0.4)])
    assert scalars["val/AP/digit_0"] == approx([(10, 0.5), (20, 0.75)])
    assert scalars["val/AP/a_b__"] == approx([(10, 0.25), (20, 0.5)])  # an emoji and a comma become _
    assert "val/AP/unseen" not in scalars  # no positive: no AP to log
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr = 0.003" in text
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(0.003)
    assert start.hparams["data.root"].string_value == "data/demo"

    client, runs = _mlflow(run_dir)
    (run,) = runs
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in PARAMS.items()}
    rid = run.info.run_id
    assert _history(client, rid, "val_mAP") == [(1, pytest.approx(0.3)), (2, pytest.approx(0.4))]
    assert _history(client, rid, "val_loss") == [(1, pytest.approx(0.6)), (2, pytest.approx(0.3))]
    assert _history(client, rid, "train_loss") == [(1, pytest.approx(0.5)), (2, pytest.approx(0.25))]
    assert _history(client, rid, "lr") == [(5, 0.001), (10, 0.001), (15, 0.002), (20, 0.002)]
    assert _history(client, rid, "val_AP/digit_0") == [(1, 0.5), (2, 0.75)]
    assert sorted(a.path for a in client.list_artifacts(rid)) == ["metrics.csv", "recipe.toml"]
    assert not (run_dir.parent.parent.parent / "mlruns").exists()  # artifacts beside the store, not in the cwd


def test_a_resumed_run_continues_the_same_mlflow_run_and_logs_every_epoch_once(run_dir):
    warnings: list[str] = []
    first = _open(run_dir, warnings)
    _epoch(first, 1)
    _epoch(first, 2)
    first.close("stopped")
    _, (stopped,) = _mlflow(run_dir)
    assert stopped.info.status == "KILLED"

    again = _open(run_dir, warnings, resumed=True)
    _epoch(again, 2)  # the epoch the state file had not seen yet is trained (and logged) again
    _epoch(again, 3)
    again.close("finished")
    assert warnings == []

    client, runs = _mlflow(run_dir)
    assert len(runs) == 1 and runs[0].info.run_id == stopped.info.run_id and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    assert _history(client, rid, "val_mAP") == [(1, pytest.approx(0.3)), (2, pytest.approx(0.4)),
                                                 (3, pytest.approx(0.5))]
    assert [s for s, _ in _history(client, rid, "lr")] == [5, 10, 15, 20, 25, 30]
    scalars, _ = _scalars(run_dir)
    assert [s for s, _ in scalars["val/mAP"]] == [10, 20, 30]  # the replayed step 20 replaces the old one
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20, 25, 30]


def test_an_unreachable_tracking_server_is_a_warning_and_training_goes_on(run_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    warnings: list[str] = []
    start = time.perf_counter()
    trackers = _open(run_dir, warnings, names=["mlflow"])
    _epoch(trackers, 1)
    trackers.close("finished")
    assert time.perf_counter() - start < 10
    assert trackers.names == []
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0] and "training goes on" in warnings[0]


def test_a_backend_that_fails_mid_run_is_switched_off_with_one_warning(run_dir):
    warnings: list[str] = []
    trackers = _open(run_dir, warnings)
    mlflow_backend = trackers.backends[1]

    def broken(*args, **kwargs):
        raise ConnectionError("server went away")

    mlflow_backend.client.log_batch = broken
    _epoch(trackers, 1)
    _epoch(trackers, 2)
    trackers.close("finished")
    assert len(warnings) == 1 and "mlflow: logging failed (ConnectionError: server went away)" in warnings[0]
    assert trackers.names == ["tensorboard"]
    scalars, _ = _scalars(run_dir)
    assert [s for s, _ in scalars["val/mAP"]] == [10, 20]  # TensorBoard kept logging


@pytest.mark.parametrize("name, modules, pip", [
    ("mlflow", ["mlflow", "mlflow.tracking"], "pip install 'aicoss[mlflow]'"),
    ("tensorboard", ["torch.utils.tensorboard"], "pip install 'aicoss[tensorboard]'"),
])
def test_a_missing_extra_is_a_one_line_error_naming_the_pip_command(run_dir, monkeypatch, name, modules, pip):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    with pytest.raises(UserError) as info:
        _open(run_dir, [], names=[name])
    assert pip in str(info.value) and "\n" not in str(info.value)
    assert not (run_dir / "tensorboard").exists() and not (run_dir.parent.parent / "mlflow.db").exists()


def test_recipe_loggers_key(tmp_path):
    from aicoss_cli.recipe import load_recipe, recipe_from_toml, recipe_to_toml

    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[model]\narch = "tiny_convnet"\n[runtime]\nloggers = ["mlflow"]\n')
    assert load_recipe(path, check_names=False).runtime.loggers == ["mlflow"]
    both = load_recipe(path, ["runtime.loggers=tensorboard,mlflow"], check_names=False)
    assert both.runtime.loggers == ["tensorboard", "mlflow"]
    assert recipe_from_toml(recipe_to_toml(both), "x").runtime.loggers == ["tensorboard", "mlflow"]
    path.write_text('name = "r"\n[model]\narch = "tiny_convnet"\n')
    assert load_recipe(path, check_names=False).runtime.loggers == []
    with pytest.raises(UserError) as info:
        load_recipe(path, ["runtime.loggers=wandb"], check_names=False)
    assert "[runtime] loggers" in str(info.value) and "'tensorboard' or 'mlflow'" in str(info.value)


def test_recipe_params_are_the_flattened_resolved_recipe():
    from aicoss_cli.recipe import validate_recipe

    recipe = validate_recipe({"name": "r", "model": {"arch": "tiny_convnet", "img_size": 32},
                              "optim": {"lr": 0.01}, "runtime": {"loggers": ["tensorboard", "mlflow"]}}, "r")
    params = recipe_params(recipe)
    assert params["name"] == "r" and params["model.arch"] == "tiny_convnet" and params["model.img_size"] == 32
    assert params["optim.lr"] == 0.01 and params["optim.epochs"] == 10 and params["model.pretrained"] is False
    assert params["runtime.loggers"] == "tensorboard,mlflow"
    assert "loss.gamma_pos" not in params  # unset keys are left out
    assert len(params) == 2 + sum(
        sum(v is not None for v in section.values()) for key, section in recipe.model_dump().items()
        if isinstance(section, dict))


def test_training_with_both_loggers_logs_what_metrics_csv_holds_and_a_resume_continues_one_mlflow_run(
        run_cli, demo_root, write_recipe, tmp_path, monkeypatch):
    """The Trainer end to end: every epoch's val mAP (raw and EMA weights) in TensorBoard and MLflow
    equals metrics.csv, also across a stop and a resume (one MLflow run, every epoch once)."""
    import csv
    import signal

    import aicoss_cli.train.trainer as engine

    from helpers import only_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = write_recipe(demo_root, epochs=3, extra="")
    text = recipe.read_text().replace("[runtime]\n", '[runtime]\nloggers = ["tensorboard", "mlflow"]\n')
    text = text.replace("weight_decay = 0.0", "weight_decay = 0.0\nema_decay = 0.9")
    recipe.write_text(text)
    real = engine.Trainer._end_epoch

    def stop_after_epoch_2(self, bar):
        real(self, bar)
        if self.progress.epoch == 2:
            signal.raise_signal(signal.SIGINT)  # the next step boundary saves and stops

    monkeypatch.setattr(engine.Trainer, "_end_epoch", stop_after_epoch_2)
    stopped = run_cli("train", recipe, "--out", tmp_path / "runs")
    assert stopped.code == 130, stopped.stderr
    monkeypatch.setattr(engine.Trainer, "_end_epoch", real)
    run = only_run_dir(tmp_path / "runs")
    resumed = run_cli("train", "--resume", run)
    assert resumed.code == 0, resumed.stderr

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    scalars, _ = _scalars(run)
    client, runs = _mlflow(run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for column, board, mlflow_key in (("val_map", "val/mAP", "val_mAP"), ("val_map_ema", "val/mAP_ema", "val_mAP_ema")):
        values = [float(row[column]) for row in rows]
        assert [pytest.approx(v, rel=1e-5) for _, v in scalars[board]] == values
        assert _history(client, runs[0].info.run_id, mlflow_key) == [(e + 1, pytest.approx(v, rel=1e-5))
                                                                     for e, v in enumerate(values)]
    assert (run / "curves.png").is_file() and (run / "run.json").is_file()
