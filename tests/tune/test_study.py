"""The study outside the CLI: a trial whose process died, and the docs' Python API example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna  # the tune extra, which `make install` installs
import pytest

from helpers import ROOT


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


@pytest.mark.slow
def test_the_readme_python_api_example_runs(demo_root, tmp_path, monkeypatch, capsys):
    """The docs' Python API block as a user would paste it, on the tests' small data, with one
    epoch and two trials."""
    readme = (ROOT / "docs" / "python-api.md").read_text()
    block = readme.split("# Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shorter = {'"data/demo"': repr(str(demo_root)), "trials=20": "trials=2", "epochs=3)": "epochs=1)",
               '["optim.epochs=3"]': '["optim.epochs=1", "optim.warmup_epochs=0"]'}
    for old, new in shorter.items():
        assert old in block, old
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    exec(compile(block, "docs/python-api.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].endswith(str(Path("runs/tune/starter-demo/best.toml")))
    assert (tmp_path / "val.csv").is_file() and (tmp_path / "val_labels.csv").is_file()
    assert len(list((tmp_path / "runs" / "demo").glob("*/best.safetensors"))) == 1
