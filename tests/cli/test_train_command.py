"""Training end to end through the real CLI: the run folder, its files, and bad input; validate and the
bundled recipes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from helpers import ROOT, assert_one_line_error, only_run_dir, read_rows

RUN_FILES = {"recipe.toml", "metrics.csv", "best.safetensors", "last.safetensors", "train_state.safetensors",
             "val_scores.csv", "submission.csv"}


def test_one_epoch_writes_every_run_file(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, epochs=2)
    result = run_cli("train", recipe, "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    run = only_run_dir(tmp_path / "runs")
    assert run.parent.name == "tiny"
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    metrics = read_rows(run / "metrics.csv")
    assert metrics[0] == ["epoch", "lr", "train_loss", "val_loss", "val_map", "seconds"]
    assert [row[0] for row in metrics[1:]] == ["1", "2"]
    assert float(metrics[1][1]) == pytest.approx(3e-3)  # epoch 1 runs at the peak lr (cosine, stepped per epoch)

    sample = read_rows(demo_root / "sample_submission.csv")
    submission = read_rows(run / "submission.csv")
    assert submission[0] == sample[0]
    assert [r[0] for r in submission[1:]] == [r[0] for r in sample[1:]]
    probs = np.array([[float(v) for v in r[1:]] for r in submission[1:]])
    assert ((probs >= 0) & (probs <= 1)).all()

    val_scores = read_rows(run / "val_scores.csv")
    assert val_scores[0] == ["img_id"] + sample[0][1:] and len(val_scores) - 1 == 48  # 20 % of 240

    from aicoss_cli.models.checkpoint import load_checkpoint
    from aicoss_cli.recipe import recipe_from_toml

    _, meta = load_checkpoint(run / "best.safetensors")
    best_epoch = 1 + int(np.argmax([float(r[4]) for r in metrics[1:]]))
    assert meta.epoch == best_epoch and meta.classes == sample[0][1:] and meta.arch == "tiny_convnet"
    assert meta.val_map == pytest.approx(float(metrics[best_epoch][4]), rel=1e-5)
    assert recipe_from_toml(meta.recipe_toml, "meta") == recipe_from_toml((run / "recipe.toml").read_text(), "run")
    assert "best val mAP" in result.stdout and "val mAP" in result.stdout
    # not a terminal (a log file): plain progress lines stand in for the bar, 6 steps per epoch
    assert "epoch 2/2  step 3/6  loss " in result.stderr and "eta 0:" in result.stderr
    assert "step 6/6" not in result.stderr and "━" not in result.stderr  # no bar; the epoch's own line closes it


def test_val_map_in_metrics_is_the_map_of_val_scores(run_cli, demo_root, write_recipe, tmp_path):
    from aicoss_cli.data.tables import read_train
    from aicoss_cli.evaluation.metrics import mean_average_precision

    assert run_cli("train", write_recipe(demo_root), "--out", tmp_path).code == 0
    run = only_run_dir(tmp_path)
    rows = read_rows(run / "val_scores.csv")
    table = read_train(demo_root)
    by_id = dict(zip(table.ids, table.labels))
    targets = np.stack([by_id[r[0]] for r in rows[1:]])
    scores = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert mean_average_precision(targets, scores) == pytest.approx(float(read_rows(run / "metrics.csv")[1][4]), abs=1e-6)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda root: (root / "train.csv").unlink(), "train.csv not found"),
        (lambda root: (root / "train" / "TRAIN_00007.jpg").unlink(), "1 of 240 images are missing"),
        (lambda root: (root / "train.csv").write_text((root / "train.csv").read_text().replace(",1\n", ",7\n", 1)),
         "is not one of -1, 0, 1"),
        (lambda root: (root / "train.csv").write_text((root / "train.csv").read_text().replace("img_id", "id", 1)),
         "missing column 'img_id'"),
    ],
    ids=["no train.csv", "missing image", "bad label", "no img_id"],
)
def test_bad_data_stops_before_any_run_folder(run_cli, demo_root, write_recipe, tmp_path, damage, expected):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    damage(root)
    result = run_cli("train", write_recipe(root), "--out", tmp_path / "runs")
    assert result.code == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_recipe_stops_before_any_run_folder(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(demo_root, extra="")
    result = run_cli("train", recipe, "--out", tmp_path / "runs", "--set", "optim.lr=-1")
    assert result.code == 2 and "[optim] lr" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train", recipe, "--out", tmp_path / "runs", "--set", "optim.epocs=1")
    assert result.code == 2 and "did you mean 'optim.epochs'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_data_option_overrides_the_recipe_root(run_cli, demo_root, write_recipe, tmp_path):
    recipe = write_recipe(tmp_path / "not-here")
    result = run_cli("validate", recipe, "--data", demo_root)
    assert result.code == 0, result.stderr
    assert "240 labelled images (192 train, 48 val), 40 test images, 10 classes" in result.stdout
    assert run_cli("validate", recipe, "--data", tmp_path / "not-here").code == 2


def test_submission_is_what_predict_writes_for_the_best_checkpoint(run_cli, demo_root, write_recipe, tmp_path):
    """Training's test pass and `aicoss predict` run the same forward loop: the same file, byte for byte."""
    assert run_cli("train", write_recipe(demo_root, epochs=2), "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    result = run_cli("predict", run / "best.safetensors", "--out", tmp_path / "predicted.csv")
    assert result.code == 0, result.stderr
    assert (tmp_path / "predicted.csv").read_bytes() == (run / "submission.csv").read_bytes()
    val = run_cli("predict", run / "best.safetensors", "--split", "val", "--out", tmp_path / "val.csv")
    assert val.code == 0, val.stderr
    assert (tmp_path / "val.csv").read_bytes() == (run / "val_scores.csv").read_bytes()


def test_recipes_lists_every_bundled_recipe(run_cli):
    result = run_cli("recipes")
    assert result.code == 0, result.stderr
    for path in (ROOT / "recipes").glob("*.toml"):
        assert path.stem in result.stdout


@pytest.mark.slow  # builds every seed arch at full size
@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.stem)
def test_each_bundled_recipe_validates_and_its_arch_builds(path):
    from aicoss_cli.models import build_model
    from aicoss_cli.recipe import load_recipe, resolve_recipe

    recipe = resolve_recipe(load_recipe(path))
    with torch.device("meta"):
        model = build_model(recipe.model.arch, 60, pretrained=False, img_size=recipe.model.img_size)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_train_finds_a_bundled_recipe_by_name(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "demo", "--data", tmp_path / "nowhere")
    assert_one_line_error(result, "nowhere", "data folder not found")  # the recipe itself was found
    assert_one_line_error(run_cli("train", "no_such_recipe"), "no_such_recipe", "not found", "aicoss recipes")


def test_an_image_above_the_pixel_limit_is_a_one_line_error(run_cli, data_copy, write_recipe, tmp_path, monkeypatch,
                                                            recwarn):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150 * 150)  # PIL's limit, scaled down for the test
    Image.new("L", (200, 200)).save(data_copy / "train" / "big.png")  # 40,000 pixels: a warning, not an error
    path = data_copy / "train.csv"
    path.write_text(path.read_text().replace("./train/TRAIN_00009.jpg", "./train/big.png"))
    result = run_cli("train", write_recipe(data_copy), "--out", tmp_path / "runs")
    assert_one_line_error(result, "train.csv", "big.png", "40000 pixels", "22500", "downscale")
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
