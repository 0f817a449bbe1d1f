"""count-params, import-weights and prior through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, only_run_dir

SEED_COUNTS_M = {  # the seed README's table, as printed
    "resnet50": "23.63", "resnet101": "42.62", "tresnetv2_l_mldecoder": "51.26", "tresnet_xl": "75.94",
    "tresnet_xl_mldecoder": "83.38", "tresnet_xl_learnable_mldecoder": "83.42", "cvt_q2l": "36.75", "cvt384_q2l": "281.8",
}


def test_count_params_reproduces_the_seed_table(run_cli):
    result = run_cli("count-params", *SEED_COUNTS_M, "--json")
    assert result.code == 0, result.stderr
    rows = {r["arch"]: r for r in json.loads(result.stdout)}
    for arch, printed in SEED_COUNTS_M.items():
        # ±0.01 M, or half a unit of the last digit the seed printed (281.8 has one decimal)
        tolerance = max(0.01, 0.5 * 10 ** -len(printed.split(".")[1])) + 1e-9
        assert abs(rows[arch]["params"] / 1e6 - float(printed)) <= tolerance, (arch, rows[arch]["params"])
    assert rows["cvt_q2l"]["backbone"] == "CvT_21" and rows["cvt_q2l"]["decoder"] == "Q2L"
    table = run_cli("count-params", "tresnet_xl_mldecoder")
    assert "TResNet_XL" in table.stdout and "83.38" in table.stdout


def test_count_params_unknown_arch(run_cli):
    result = run_cli("count-params", "tresnet_xxl")
    assert result.code == 2 and "tresnet_xl" in result.stderr


def test_import_weights_makes_a_checkpoint_predict_can_use(run_cli, demo_root, tmp_path):
    from aicoss_cli.models import build_model
    from aicoss_cli.models.checkpoint import load_checkpoint

    torch.manual_seed(0)
    model = build_model("tiny_convnet", 10)
    pt = tmp_path / "seed.pt"
    torch.save(model.state_dict(), pt)  # what the seed's Google-Drive files are
    out = tmp_path / "imported.safetensors"
    result = run_cli("import-weights", pt, "--arch", "tiny_convnet", "--classes", demo_root / "train.csv",
                     "--out", out, "--img-size", "32", "--data", demo_root)
    assert result.code == 0, result.stderr
    state, meta = load_checkpoint(out)
    assert meta.classes == [f"digit_{d}" for d in range(10)] and meta.arch == "tiny_convnet" and meta.img_size == 32
    assert meta.split["split_seed"] == 78 and meta.split["val_fingerprint"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = run_cli("import-weights", pt, "--arch", "tiny_convnet", "--classes", demo_root / "train.csv", "--out", out)
    assert again.code == 2 and "already exists" in again.stderr


def test_import_weights_refuses_weights_of_another_arch_or_class_count(run_cli, demo_root, tmp_path):
    from aicoss_cli.models import build_model

    pt = tmp_path / "seed.pt"
    torch.save(build_model("tiny_convnet", 7).state_dict(), pt)
    result = run_cli("import-weights", pt, "--arch", "tiny_convnet", "--classes", demo_root / "train.csv",
                     "--out", tmp_path / "x.safetensors")
    assert result.code == 2 and "shape mismatch" in result.stderr and "10 classes" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_import_weights_never_unpickles(run_cli, demo_root, tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    pt = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, pt)
    result = run_cli("import-weights", pt, "--arch", "tiny_convnet", "--classes", demo_root / "train.csv",
                     "--out", tmp_path / "x.safetensors")
    assert result.code == 2 and not (tmp_path / "pwned").exists()


PASL_SELECTIVE = """
[loss]
name = "partial_selective"
partial_mode = "selective"
prior_threshold = 0.3
prior = "{prior}"
"""


def pasl_recipe(write_recipe, root, prior):
    path = write_recipe(root, loss="partial_selective")
    text = path.read_text()
    start, end = text.index("[loss]"), text.index("[optim]")
    path.write_text(text[:start] + PASL_SELECTIVE.format(prior=prior).lstrip() + "\n" + text[end:])
    return path


def read_prior(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {row["Classes"]: float(row["avg_pred"]) for row in csv.DictReader(f)}


def test_prior_command_and_the_three_prior_sources(run_cli, demo_root_partial, write_recipe, tmp_path):
    from aicoss_cli.data.splits import split_indices
    from aicoss_cli.data.tables import read_train
    from aicoss_cli.models.checkpoint import load_checkpoint

    # labels: positive frequency of each class over the annotated training entries
    assert run_cli("train", pasl_recipe(write_recipe, demo_root_partial, "labels"), "--out", tmp_path / "a").code == 0
    run = only_run_dir(tmp_path / "a")
    table = read_train(demo_root_partial)
    train_rows, _ = split_indices(table.labels, "random", 0.2, 78)
    labels = torch.from_numpy(table.labels[train_rows]).float()
    expected = ((labels == 1).sum(0) / (labels != -1).sum(0)).tolist()
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta.prior == pytest.approx(expected, abs=1e-6)

    # predictions: `aicoss prior` on a trained checkpoint, written as Classes,avg_pred
    prior_csv = tmp_path / "prior.csv"
    result = run_cli("prior", run / "best.safetensors", "--data", demo_root_partial, "--out", prior_csv)
    assert result.code == 0, result.stderr
    values = read_prior(prior_csv)
    assert list(values) == table.classes and all(0 <= v <= 1 for v in values.values())
    assert run_cli("prior", run / "best.safetensors", "--out", prior_csv).code == 2  # never overwritten

    # a path: the CSV, matched by name even when its rows are shuffled
    rows = list(csv.reader(open(prior_csv)))
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join(",".join(r) for r in [rows[0]] + rows[1:][::-1]) + "\n")
    assert run_cli("train", pasl_recipe(write_recipe, demo_root_partial, shuffled), "--out", tmp_path / "b").code == 0
    _, meta = load_checkpoint(only_run_dir(tmp_path / "b") / "best.safetensors")
    assert meta.prior == pytest.approx([values[c] for c in table.classes], abs=1e-6)

    # predictions during training: the previous epoch's mean prediction, stored in the run
    recipe = pasl_recipe(write_recipe, demo_root_partial, "predictions")
    assert run_cli("train", recipe, "--out", tmp_path / "c", "--set", "optim.epochs=2").code == 0
    run_c = only_run_dir(tmp_path / "c")
    stored = read_prior(run_c / "prior.csv")
    assert list(stored) == table.classes and all(0 < v < 1 for v in stored.values())
    _, last = load_checkpoint(run_c / "last.safetensors")
    assert last.prior is not None and len(last.prior) == 10  # epoch 2 trained with epoch 1's prior


def test_prior_with_a_wrong_class_set_is_a_clear_error(run_cli, demo_root_partial, write_recipe, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Classes,avg_pred\n" + "".join(f"digit_{d},0.2\n" for d in range(9)) + "cat,0.5\n")
    result = run_cli("train", pasl_recipe(write_recipe, demo_root_partial, bad), "--out", tmp_path / "runs")
    assert result.code == 2 and "bad.csv" in result.stderr and "'digit_9'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_prior_that_changes_nothing_is_said_plainly(run_cli, demo_root, write_recipe, tmp_path):
    result = run_cli("train", pasl_recipe(write_recipe, demo_root, "labels"), "--out", tmp_path)
    assert result.code == 0 and "changes nothing" in result.stdout + result.stderr


@pytest.mark.parametrize("name, recipe_name", [("_weights", "weights"), ("modèle", "mod_le"), ("🚀", "imported"),
                                               ("a b", "a_b")])
def test_import_weights_takes_any_output_name(run_cli, demo_root, tmp_path, name, recipe_name):
    import torch

    from aicoss_cli.models import build_model
    from aicoss_cli.models.checkpoint import read_meta
    from aicoss_cli.recipe import recipe_from_toml

    pt = tmp_path / "seed.pt"
    torch.save(build_model("tiny_convnet", 10).state_dict(), pt)
    out = tmp_path / f"{name}.safetensors"
    result = run_cli("import-weights", pt, "--arch", "tiny_convnet", "--classes", demo_root / "train.csv", "--out", out,
                     "--img-size", "32")
    assert result.code == 0, result.stderr
    assert recipe_from_toml(read_meta(out).recipe_toml, "stored").name == recipe_name


def test_import_weights_image_size_is_range_checked_in_one_line(run_cli, demo_root, tmp_path):
    from aicoss_cli.models.checkpoint import IMG_SIZE_MAX, IMG_SIZE_MIN

    args = ["import-weights", tmp_path / "seed.pt", "--arch", "tiny_convnet", "--classes", demo_root / "train.csv",
            "--out", tmp_path / "x.safetensors", "--img-size"]
    assert_one_line_error(run_cli(*args, "5000"), "--img-size", f"less than or equal to {IMG_SIZE_MAX}")
    assert_one_line_error(run_cli(*args, "8"), "--img-size", f"greater than or equal to {IMG_SIZE_MIN}")
    assert not (tmp_path / "x.safetensors").exists()
