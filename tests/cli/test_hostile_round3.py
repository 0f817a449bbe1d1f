"""The third round of hostile use, through the real CLI: read-only folders, NaN weights, odd class
names and labels, duplicated images, data from another folder, outputs that are inputs, narrow
terminals, an ASCII-only terminal, the command list, and predict reproducing val_scores.csv."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_RECIPE, assert_one_line_error, only_run_dir, save_random_checkpoint
from sandbox import assert_one_line, run_aicoss


def fake_run(folder: Path, root: Path) -> Path:
    """A finished run folder as `report` reads it: its recipe and two epochs of metrics."""
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(TINY_RECIPE.format(arch="tiny_convnet", loss="bce", epochs=2, policy="weak",
                                                           root=root))
    (folder / "metrics.csv").write_text("epoch,lr,train_loss,val_loss,val_map,seconds\n"
                                        "1,0.003,0.6,0.5,0.3,1.0\n2,0.001,0.5,0.4,0.4,1.0\n")
    return folder


# --------------------------------------------------------------------------- read-only places


def test_report_and_demo_data_in_a_read_only_folder_are_one_line(demo_root, tmp_path):
    runs = [fake_run(tmp_path / "runs" / "tiny" / f"2026010{i}T000000Z", demo_root) for i in (1, 2)]
    here = tmp_path / "here"
    here.mkdir()
    ran = run_aicoss(["report", *runs], cwd=here, read_only=[here])  # default --out ./report
    assert_one_line(ran, "report", "cannot be written")
    ran = run_aicoss(["demo-data", "demo", "--n-train", "10", "--n-test", "2", "--size", "16"], cwd=here,
                     read_only=[here])
    assert_one_line(ran, "demo", "cannot be written")
    assert list(here.iterdir()) == []


def test_report_of_a_run_on_a_read_only_file_system_is_refused_before_drawing(demo_root, tmp_path):
    run = fake_run(tmp_path / "runs" / "tiny" / "20260101T000000Z", demo_root)
    ran = run_aicoss(["report", run], cwd=tmp_path, read_only=[run])  # default --out: the run's own folder
    assert_one_line(ran, str(run), "cannot be written")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "recipe.toml"]


# --------------------------------------------------------------------------- NaN weights


@pytest.fixture
def nan_checkpoint(demo_root, tmp_path) -> Path:
    from aicoss_cli.models.checkpoint import load_checkpoint, read_meta, save_checkpoint

    path = save_random_checkpoint(tmp_path / "nan" / "best.safetensors", demo_root)
    state, meta = load_checkpoint(path)[0], read_meta(path)
    save_checkpoint(path, {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in state.items()}, meta)
    return path


def test_nan_weights_are_one_error_naming_the_checkpoint_and_nothing_is_written(run_cli, demo_root, tmp_path,
                                                                                nan_checkpoint):
    good = save_random_checkpoint(tmp_path / "good.safetensors", demo_root)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["predict", nan_checkpoint, "--split", "val", "--out", out / "p.csv", "--labels", "0.5"],
                 ["predict", nan_checkpoint, "--out", out / "t.csv"],
                 ["ensemble", good, nan_checkpoint, "--out", out / "e.csv"],
                 ["prior", nan_checkpoint, "--out", out / "prior.csv"]):
        assert_one_line_error(run_cli(*args), str(nan_checkpoint), "not finite")
        assert list(out.iterdir()) == [], args


def test_validate_checks_a_prior_file_as_train_does(run_cli, demo_root, write_recipe, tmp_path):
    prior = tmp_path / "prior.csv"
    prior.write_text("Classes,avg_pred\n" + "".join(f"digit_{d},nan\n" for d in range(10)))
    recipe = write_recipe(demo_root)
    recipe.write_text(recipe.read_text().replace('name = "bce"', f'name = "bce"\nprior = "{prior}"'))
    assert_one_line_error(run_cli("validate", recipe, "--data", demo_root), str(prior), "avg_pred", "[0, 1]")


# --------------------------------------------------------------------------- what the CSVs hold


def test_class_names_with_spaces_around_them_keep_the_header_exactly(run_cli, data_copy, tmp_path):
    root = data_copy
    for name in ("train.csv", "sample_submission.csv"):
        text = (root / name).read_text()
        (root / name).write_text(text.replace("digit_0,", " digit 0 ,", 1).replace("digit_1,", "digit_1  ,", 1))
    header = (root / "sample_submission.csv").read_text().splitlines()[0]
    assert " digit 0 ," in header
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", root)
    for split in ("test", "val"):
        result = run_cli("predict", checkpoint, "--split", split, "--out", tmp_path / f"{split}.csv", "--labels", "0.5")
        assert result.code == 0, result.stderr
        assert (tmp_path / f"{split}.csv").read_text().splitlines()[0] == header
    again = run_cli("predict", checkpoint, "--labels", tmp_path / "test_thresholds.csv", "--out", tmp_path / "again.csv")
    assert again.code == 0, again.stderr  # the thresholds file it wrote reads back with these names


def test_an_empty_label_cell_is_called_empty(run_cli, demo_root, data_copy, write_recipe):
    root = data_copy
    lines = (root / "train.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[5] = ""
    lines[3] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    message = run_cli("validate", write_recipe(root), "--data", root).stderr
    assert "row 4" in message and "is empty" in message and "nan" not in message, message
    score = run_cli("score", demo_root / "test_labels.csv", root / "train.csv")
    assert "is empty" in score.stderr and "''" not in score.stderr, score.stderr


def test_the_same_image_under_two_ids_is_a_warning_naming_them(run_cli, data_copy, write_recipe, tmp_path):
    from aicoss_cli.data.splits import split_indices
    from aicoss_cli.data.tables import read_train

    root = data_copy
    table = read_train(root)
    _, val = split_indices(table.labels, "random", 0.2, 78)
    train_row, val_row = next(i for i in range(len(table)) if i not in set(val)), int(val[0])
    shutil.copy(table.paths[train_row], table.paths[val_row])  # a train image copied over a val image
    other = [i for i in range(len(table)) if i not in set(val) and i != train_row][:2]
    shutil.copy(table.paths[other[0]], table.paths[other[1]])  # and a pair inside the train split
    result = run_cli("validate", write_recipe(root), "--data", root)
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "2 pairs of ids hold the same image" in text, text
    assert table.ids[train_row] in text and table.ids[val_row] in text
    assert "1 of them straddles the val split" in text


def test_predict_on_data_with_another_split_says_so(run_cli, demo_root, tmp_path):
    from aicoss_cli.data.demo import build_demo_data

    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    other = build_demo_data(tmp_path / "other", n_train=200, n_test=40, size=32, seed=5)
    result = run_cli("predict", checkpoint, "--data", other, "--out", tmp_path / "p.csv")
    assert result.code == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "note:" in text and str(other) in text and "another" in text and "split" in text, text
    same = run_cli("predict", checkpoint, "--data", demo_root, "--out", tmp_path / "q.csv")
    assert "note:" not in same.stdout + same.stderr
    assert_one_line_error(run_cli("predict", checkpoint, "--data", other, "--split", "val", "--out",
                                  tmp_path / "v.csv"), str(checkpoint), "--data")


def test_an_output_may_not_be_an_input_of_the_command(run_cli, demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    assert run_cli("predict", checkpoint, "--labels", "0.4", "--out", tmp_path / "p.csv").code == 0
    thresholds = tmp_path / "p_thresholds.csv"
    before = thresholds.read_bytes()
    for out in (thresholds, tmp_path / "p.csv"):  # the file itself, and the --out that writes it again
        assert_one_line_error(run_cli("predict", checkpoint, "--labels", thresholds, "--out", out, "--overwrite"),
                              str(thresholds), "input")
        assert_one_line_error(run_cli("ensemble", checkpoint, "--labels", thresholds, "--out", out, "--overwrite"),
                              str(thresholds), "input")
    assert thresholds.read_bytes() == before


# --------------------------------------------------------------------------- the terminal


def aicoss(*args, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aicoss_cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), cwd=cwd)


def test_a_40_column_terminal_never_cuts_a_number(demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    proc = aicoss("predict", checkpoint, "--split", "val", "--out", tmp_path / "v.csv", env={"COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "v_per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "…" not in proc.stdout
    numbers = set(re.findall(r"\d+\.\d+", proc.stdout))
    for row in rows:
        for key in ("ap", "f1", "precision", "recall"):
            if row[key]:
                assert f"{float(row[key]):.4f}" in numbers, (key, row[key], proc.stdout)


def test_an_ascii_only_terminal_with_a_non_ascii_path_is_no_traceback(tmp_path):
    proc = aicoss("demo-data", tmp_path / "démo_ü", "--n-train", "10", "--n-test", "2", "--size", "16",
                  env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "demo data written to" in proc.stdout and (tmp_path / "démo_ü" / "train.csv").is_file()


def test_the_command_list_is_one_short_line_per_command():
    proc = aicoss("--help", env={"COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    from aicoss_cli.cli.app import COMMANDS

    for name, _ in COMMANDS:
        line = next(row for row in proc.stdout.splitlines() if row.startswith(f"│ {name} "))
        summary = line.strip("│ ").removeprefix(name).strip()
        assert 10 < len(summary) <= 70, (name, summary)
    details = " ".join(aicoss("split", "--help", env={"COLUMNS": "250"}).stdout.split())
    assert "the gap between the train and val positive rate of every class" in details


# --------------------------------------------------------------------------- val_scores.csv


@pytest.mark.slow  # trains resnet18_mldecoder for an epoch: ~10 s on 2 shared cores
def test_predict_split_val_reproduces_val_scores_byte_for_byte(run_cli, demo_root, write_recipe, tmp_path):
    """resnet18's kernels round differently for another batch composition: predict must batch the
    val images as validation did."""
    assert run_cli("train", write_recipe(demo_root, arch="resnet18_mldecoder"), "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    result = run_cli("predict", run / "best.safetensors", "--split", "val", "--out", tmp_path / "val.csv")
    assert result.code == 0, result.stderr
    assert (tmp_path / "val.csv").read_bytes() == (run / "val_scores.csv").read_bytes()
    result = run_cli("predict", run / "best.safetensors", "--out", tmp_path / "test.csv")
    assert (tmp_path / "test.csv").read_bytes() == (run / "submission.csv").read_bytes()
