"""Issue 15, "what a new user tripped over": one test (or a few) per defect, each failing before its fix.

The numbers in the section titles are the issue's items."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, assert_one_line_error


@pytest.fixture
def umask():
    """`umask(value)` sets the process umask for one test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- 1: file modes follow the umask


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(mask, umask, tmp_path):
    import numpy as np
    import torch

    from aicoss_cli.base.files import write_text_atomic
    from aicoss_cli.data.submission import write_scores_csv
    from aicoss_cli.models.checkpoint import CheckpointMeta, save_checkpoint
    from aicoss_cli.train.prior import write_prior_csv

    umask(mask)
    expected = 0o666 & ~mask
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, CheckpointMeta("tiny_convnet", 32, ["a", "b"]))
    write_text_atomic(tmp_path / "b.toml", "x = 1\n")
    write_scores_csv(tmp_path / "c.csv", ["i"], ["a", "b"], np.array([[0.5, 0.25]]))
    write_prior_csv(tmp_path / "d.csv", ["a", "b"], [0.5, 0.25])
    for name in ("a.safetensors", "b.toml", "c.csv", "d.csv"):
        assert mode(tmp_path / name) == expected, (name, oct(mode(tmp_path / name)), oct(expected))


def test_the_demo_folder_follows_the_umask(umask, tmp_path, run_cli):
    umask(0o022)
    result = run_cli("demo-data", tmp_path / "demo", "--n-train", "10", "--n-test", "2", "--size", "16")
    assert result.code == 0, result.stderr
    root = tmp_path / "demo"
    assert mode(root) == 0o755 and mode(root / "train") == 0o755
    assert mode(root / "train.csv") == 0o644 and mode(next((root / "train").iterdir())) == 0o644


# --------------------------------------------------------------------------- 5, 6, 7: help text


def aicoss(*args) -> subprocess.CompletedProcess:
    """`aicoss ARGS` in a fresh process with stdout and stderr piped (not terminals), COLUMNS unset."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "aicoss_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_help_keeps_bracketed_section_names(run_cli):
    assert "(overrides [data] root)" in " ".join(run_cli("train", "--help").stdout.split())
    assert '[loss] prior = "prior.csv"' in " ".join(run_cli("prior", "--help").stdout.split())


def test_flags_are_shown_without_a_value(run_cli):
    from aicoss_cli.cli.app import COMMANDS

    assert "--json" in run_cli("count-params", "--help").stdout
    for name, _ in COMMANDS:
        assert "<bool>" not in run_cli(name, "--help").stdout, name


@pytest.mark.parametrize("command, option, choices", [
    ("predict", "--split", "test|val"), ("predict", "--precision", "fp32|fp16|bf16"),
    ("predict", "--tta", "none|hflip|flips"), ("ensemble", "--weights", "equal|auto"),
    ("ensemble", "--tta", "none|hflip|flips"), ("split", "--kind", "random|stratified"),
])
def test_choice_options_list_their_choices_and_refuse_others_in_one_line(run_cli, command, option, choices):
    line = next(row for row in run_cli(command, "--help").stdout.splitlines() if row.startswith(f"│ {option} "))
    assert choices in line, line
    extra = ["x.safetensors"] if command == "predict" else ["data"] if command == "split" else []
    result = run_cli(command, *extra, option, "nonsense")
    assert_one_line_error(result, option, "nonsense")


def test_version_short_help_and_shell_completion(run_cli):
    from aicoss_cli import __version__

    version = run_cli("--version")
    assert version.code == 0 and version.stdout.strip() == f"aicoss {__version__}"
    short = run_cli("predict", "-h")
    assert short.code == 0 and "--split" in short.stdout
    assert "--install-completion" in run_cli("--help").stdout


def test_a_usage_error_is_one_line(run_cli):
    result = run_cli("count-params", "--classes", "0")
    assert_one_line_error(result, "--classes", "greater than or equal to 1", "aicoss count-params --help")
    assert_one_line_error(run_cli("count-params", "--jsn"), "--jsn")


def test_help_ranges_are_what_the_command_accepts(run_cli, demo_root):
    split_help = " ".join(run_cli("split", "--help").stdout.split())
    assert "0<=x<=1" not in split_help.replace(".0", "") and "0 < x < 1" in split_help
    assert_one_line_error(run_cli("split", demo_root, "--val-fraction", "1.0"), "--val-fraction", "(0, 1)")
    demo_help = " ".join(run_cli("demo-data", "--help").stdout.split())
    assert "even" in demo_help


# --------------------------------------------------------------------------- 13, 31: output when piped


def test_piped_output_is_not_wrapped(demo_root, tmp_path):
    long_folder = tmp_path / ("very_long_folder_name_" * 8) / "demo"
    result = aicoss("demo-data", long_folder, "--n-train", "10", "--n-test", "2", "--size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and str(long_folder) in result.stdout and "test_labels.csv" in result.stdout
    split = aicoss("split", demo_root, "--search", "3", "--top", "2")
    assert split.returncode == 0, split.stderr
    assert "class-ratio gap train vs val (random, val 0.1, 3 states)" in split.stdout.splitlines()[0]
    assert split.stderr == ""


def test_an_error_after_a_progress_display_is_exactly_one_line(run_cli, demo_root, tmp_path):
    import shutil

    from helpers import save_random_checkpoint

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    (data / "test" / "TEST_00007.jpg").write_bytes(b"not a jpeg")
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", data)
    result = run_cli("predict", checkpoint, "--data", data, "--out", tmp_path / "p.csv")
    assert result.code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "TEST_00007.jpg" in result.stderr


def test_training_log_has_no_blank_lines(run_cli, demo_root, write_recipe, tmp_path):
    result = run_cli("train", write_recipe(demo_root, epochs=1), "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    assert result.stderr.startswith("run folder: ") and "\n\n" not in result.stderr, result.stderr


# --------------------------------------------------------------------------- 10: split names the whole split


@pytest.mark.parametrize("kind", ["random", "stratified"])
def test_split_suggests_every_key_of_the_split_it_searched(run_cli, demo_root, kind):
    from aicoss_cli.data.splits import split_search
    from aicoss_cli.data.tables import read_train

    result = run_cli("split", demo_root, "--kind", kind, "--search", "4", "--val-fraction", "0.2")
    assert result.code == 0, result.stderr
    best = split_search(read_train(demo_root).labels, 0.2, range(4), kind)[0]["split_seed"]
    assert (f"--set data.split={kind} --set data.val_fraction=0.2 --set data.split_seed={best}"
            in result.stdout), result.stdout


# --------------------------------------------------------------------------- 8: --set errors name the --set


RECIPE = ROOT / "recipes" / "demo.toml"


def recipe_error(*overrides: str, path: Path = RECIPE) -> str:
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.recipe import load_recipe

    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_bad_set_value_is_blamed_on_the_set_not_the_file():
    message = recipe_error("optim.epochs=ten")
    assert message.startswith("--set optim.epochs=ten: [optim] epochs") and "demo.toml" not in message, message
    assert recipe_error("model.arch=resnet5").startswith("--set model.arch=resnet5: [model] arch")
    assert recipe_error("loss.name=focal").startswith("--set loss.name=focal: ")


def test_warmup_not_below_epochs_names_the_fix():
    message = recipe_error("optim.epochs=1")  # the demo recipe warms up for 1 epoch
    assert message.startswith("--set optim.epochs=1: [optim] warmup_epochs (1) must be less than epochs (1)")
    assert "--set optim.warmup_epochs=0" in message
    from aicoss_cli.recipe import load_recipe

    assert load_recipe(RECIPE, ["optim.epochs=1", "optim.warmup_epochs=0"]).optim.epochs == 1


def test_an_error_in_the_file_is_still_blamed_on_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.read_text().replace("epochs = 6", 'epochs = "six"'))
    assert recipe_error("optim.lr=1e-3", path=path).startswith(f"{path}: [optim] epochs")


# --------------------------------------------------------------------------- 21: stored recipes are valid TOML


def test_recipes_with_astral_characters_round_trip_through_toml(tmp_path):
    import tomllib

    from aicoss_cli.recipe import load_recipe, recipe_from_toml, recipe_to_toml, resolve_recipe

    sets = ['description=rocket 🚀 "quoted" \\ back\\slash, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢', "data.root=data/🛰️ images",
            "model.pretrained=weights/🚀.pth"]
    recipe = resolve_recipe(load_recipe(RECIPE, sets))
    text = recipe_to_toml(recipe)
    assert "\\ud83d" not in text and "🚀" in text
    assert tomllib.loads(text)["data"]["root"] == "data/🛰️ images"
    assert recipe_from_toml(text, "stored") == recipe


# --------------------------------------------------------------------------- 22, 23: finite numbers, bounded seeds


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "[optim] lr"), ("optim.min_lr=nan", "[optim] min_lr"),
    ("optim.weight_decay=inf", "[optim] weight_decay"),
    ("optim.clip_grad_norm=inf", "[optim] clip_grad_norm"), ("augment.cutout_factor=nan", "[augment] cutout_factor"),
    ("data.val_fraction=nan", "[data] val_fraction"), ("loss.name=asl loss.gamma_neg=inf", "[loss] gamma_neg"),
])
def test_non_finite_numbers_are_refused(override, key):
    message = recipe_error(*override.split())
    assert key in message and "finite" in message, message


@pytest.mark.parametrize("override, expected", [
    ("runtime.seed=1e16", "[runtime] seed input should be less than 4294967296"),
    ("runtime.seed=4294967296", "[runtime] seed input should be less than 4294967296"),
    ("data.split_seed=4294967296", "[data] split_seed input should be less than 4294967296"),
    ("runtime.seed=-1", "[runtime] seed input should be greater than or equal to 0"),
])
def test_seeds_are_bounded_to_what_numpy_accepts(override, expected):
    message = recipe_error(override)
    assert message.startswith(f"--set {override}: {expected}"), message


def test_the_seed_bound_is_numpys():
    import numpy as np

    from aicoss_cli.data.splits import split_indices
    from aicoss_cli.recipe import load_recipe

    with pytest.raises(ValueError):
        np.random.RandomState(2**32)  # what scikit-learn's random_state becomes
    recipe = load_recipe(RECIPE, ["runtime.seed=4294967295", "data.split_seed=4294967295"])
    np.random.RandomState(recipe.runtime.seed)
    train, val = split_indices(np.zeros((20, 2)), "random", 0.1, recipe.data.split_seed)
    assert len(train) == 18 and len(val) == 2


# --------------------------------------------------------------------------- 2: a wheel ships the recipes


def test_a_built_wheel_lists_and_finds_the_bundled_recipes(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "aicoss_cli", source / "aicoss_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "recipes", source / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("aicoss-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = set(archive.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "aicoss_cli").rglob("*.py")}
    assert sources <= names, sorted(sources - names)  # every module, in every subpackage
    assert {f"aicoss_cli/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.toml")} <= names
    elsewhere = tmp_path / "elsewhere"  # no recipes/ folder here, no source checkout on the path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "aicoss_cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=120)

    listed = run("recipes")
    assert listed.returncode == 0, listed.stderr
    assert "tresnet_xl_pasl" in listed.stdout and str(site / "aicoss_cli" / "recipes") in listed.stdout
    found = run("validate", "tresnet_xl_pasl")
    assert found.returncode == 0, found.stderr
    assert str(site / "aicoss_cli" / "recipes" / "tresnet_xl_pasl.toml") in found.stdout


def test_train_finds_a_bundled_recipe_by_name(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "demo", "--data", tmp_path / "nowhere")
    assert_one_line_error(result, "nowhere", "data folder not found")  # the recipe itself was found
    assert_one_line_error(run_cli("train", "no_such_recipe"), "no_such_recipe", "not found", "aicoss recipes")


# --------------------------------------------------------------------------- 14: demo-data says when it reuses


def test_demo_data_says_it_reused_an_existing_set(run_cli, tmp_path):
    args = ("demo-data", tmp_path / "demo", "--n-train", "10", "--n-test", "2", "--size", "16")
    first = run_cli(*args)
    assert first.code == 0 and first.stdout.startswith(f"demo data written to {tmp_path / 'demo'}:"), first.stdout
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")}
    again = run_cli(*args)
    assert again.code == 0 and again.stdout.startswith(f"demo data in {tmp_path / 'demo'} reused"), again.stdout
    assert "nothing written" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")} == before


# --------------------------------------------------------------------------- 19, 28, 29: data the checks missed


@pytest.fixture
def data_copy(demo_root, tmp_path) -> Path:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


def data_error(root: Path, what: str = "train") -> str:
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.data.images import check_images
    from aicoss_cli.data.tables import read_test, read_train

    with pytest.raises(UserError) as info:
        if what == "train":
            table = read_train(root)
            check_images(table.paths, root / "train.csv")
        else:
            read_test(root)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["train.csv", "sample_submission.csv"])
def test_a_duplicated_class_column_is_refused_by_name(data_copy, name):
    path = data_copy / name
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("digit_4", "digit_3")  # pandas would read it as digit_3.1
    path.write_text("\n".join(lines) + "\n")
    message = data_error(data_copy, "train" if name == "train.csv" else "test")
    assert name in message and "'digit_3'" in message and "twice" in message, message


def test_a_class_named_like_a_pandas_rename_is_fine(data_copy):
    from aicoss_cli.data.tables import read_train

    path = data_copy / "train.csv"
    path.write_text(path.read_text().replace("digit_4", "digit_3.1", 1))
    assert read_train(data_copy).classes[4] == "digit_3.1"


@pytest.mark.parametrize("target", ["file", "folder"])
def test_a_symlink_out_of_the_data_root_is_refused(data_copy, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    image = data_copy / "train" / "TRAIN_00004.jpg"
    if target == "file":
        (outside / "elsewhere.jpg").write_bytes(image.read_bytes())
        image.unlink()
        image.symlink_to(outside / "elsewhere.jpg")
    else:
        (data_copy / "train").rename(outside / "train")
        (data_copy / "train").symlink_to(outside / "train")
    message = data_error(data_copy)
    first = ("row 6: img_path './train/TRAIN_00004.jpg'" if target == "file"
             else "row 2: img_path './train/TRAIN_00000.jpg'")
    assert "train.csv" in message and first in message, message
    assert "outside the data root" in message and "link" in message, message


def test_symlinks_inside_the_data_root_and_a_linked_root_are_fine(data_copy, tmp_path):
    from aicoss_cli.data.tables import read_train

    image = data_copy / "train" / "TRAIN_00004.jpg"
    (data_copy / "store").mkdir()
    image.rename(data_copy / "store" / "x.jpg")
    image.symlink_to(data_copy / "store" / "x.jpg")
    (tmp_path / "linked").symlink_to(data_copy)
    assert len(read_train(tmp_path / "linked")) == 240


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


# --------------------------------------------------------------------------- 17: checkpoint metadata is checked


def edit_metadata(path: Path, **changes: str | None) -> Path:
    """Rewrite a checkpoint's metadata (None removes a key), as a hand edit would."""
    from safetensors.torch import load_file, save_file

    from aicoss_cli.base.files import read_safetensors

    meta = read_safetensors(path, tensors=False)[1]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


@pytest.fixture
def checkpoint_file(demo_root, tmp_path) -> Path:
    from helpers import save_random_checkpoint

    return save_random_checkpoint(tmp_path / "edited.safetensors", demo_root)


SPLIT = ('{{"kind": {kind}, "val_fraction": {fraction}, "split_seed": {seed}, "n_rows": 240, "n_val": 48, '
         '"val_fingerprint": "x"}}')


@pytest.mark.parametrize("key, value, expected", [
    ("img_size", "100000", "16 and 4096"), ("img_size", "8", "16 and 4096"), ("img_size", "big", "16 and 4096"),
    ("img_size", None, "has no"), ("arch", "", "architecture name"), ("arch", None, "has no"),
    ("classes", "[]", "non-empty list"), ("classes", '["a", "a"]', "'a' twice"), ("classes", "[1, 2]", "strings"),
    ("classes", '["a", ""]', "strings"), ("classes", "not json", "JSON"), ("classes", '{"a": 1}', "non-empty list"),
    ("num_classes", "3", "10 classes"), ("epoch", "-1", "≥ 0"), ("epoch", "1.5", "≥ 0"),
    ("val_map", "inf", "[0, 1]"), ("val_map", "2", "[0, 1]"), ("val_map", "high", "[0, 1]"),
    ("split", "[]", "table"), ("split", "nope", "JSON"),
    ("split", SPLIT.format(kind='"weird"', fraction=0.2, seed=78), "kind"),
    ("split", SPLIT.format(kind='"random"', fraction=1.5, seed=78), "val_fraction"),
    ("split", SPLIT.format(kind='"random"', fraction=0.2, seed=-3), "split_seed"),
    ("split", SPLIT.format(kind='"random"', fraction='"a"', seed=78), "val_fraction"),
    ("prior", "[0.1, 0.2]", "10 values"), ("prior", "[" + ", ".join(["NaN"] * 10) + "]", "[0, 1]"),
])
def test_checkpoint_metadata_is_range_checked(checkpoint_file, key, value, expected):
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.models.checkpoint import read_meta

    edit_metadata(checkpoint_file, **{key: value})
    with pytest.raises(UserError) as info:
        read_meta(checkpoint_file)
    message = str(info.value)
    assert message.startswith(f"{checkpoint_file}: ") and key in message and expected in message, message
    assert "\n" not in message


def test_an_edited_image_size_is_refused_before_any_allocation(run_cli, checkpoint_file, demo_root, tmp_path):
    edit_metadata(checkpoint_file, img_size="100000")
    result = run_cli("predict", checkpoint_file, "--data", demo_root, "--out", tmp_path / "p.csv")
    assert_one_line_error(result, str(checkpoint_file), "img_size", "100000")
    assert not (tmp_path / "p.csv").exists()


def test_a_checkpoint_without_a_val_map_or_with_nan_reads_as_unknown(checkpoint_file):
    from aicoss_cli.models.checkpoint import CheckpointMeta, read_meta

    assert read_meta(edit_metadata(checkpoint_file, val_map="")).val_map is None
    assert read_meta(edit_metadata(checkpoint_file, val_map="nan")).val_map is None  # as older runs wrote it
    assert CheckpointMeta("tiny_convnet", 32, ["a"], val_map=float("nan")).to_strings()["val_map"] == ""


# --------------------------------------------------------------------------- 15: torchvision's public JPEG decoder


def test_jpegs_are_decoded_by_the_public_torchvision_decoder_quietly(demo_root, monkeypatch):
    import warnings

    import torch
    import torchvision.io

    from aicoss_cli.data import images as inference
    from aicoss_cli.data.tables import read_test

    from helpers import pil_pixels

    calls = []
    public = torchvision.io.decode_jpeg

    def spy(*args, **kwargs):
        calls.append(1)
        return public(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    monkeypatch.setattr(inference, "_jpeg_decoder", None)
    monkeypatch.setattr(inference, "_fast_jpeg_ok", None)
    path = read_test(demo_root).paths[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        decoded = inference.decode_image(path, 32)
    assert calls and inference._fast_jpeg_ok is True
    assert torch.equal(decoded, pil_pixels(path, 32))
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning)]


# --------------------------------------------------------------------------- 12, 16, 25: ensemble weights


@pytest.fixture
def two_members(demo_root, tmp_path) -> list[Path]:
    from helpers import save_random_checkpoint

    return [save_random_checkpoint(tmp_path / f"m{i}.safetensors", demo_root, seed=i) for i in range(2)]


@pytest.mark.parametrize("weights, expected", [("inf", "finite"), ("nan", "finite"), ("1e308", "add up")])
def test_spec_weights_must_be_finite_with_a_finite_sum(run_cli, two_members, tmp_path, weights, expected):
    spec = tmp_path / "spec.toml"
    spec.write_text("".join(f'[[member]]\npath = "{m.name}"\nweight = {weights}\n' for m in two_members))
    result = run_cli("ensemble", "--spec", spec, "--out", tmp_path / "e.csv")
    assert_one_line_error(result, "spec.toml", expected)
    assert not (tmp_path / "e.csv").exists()


def test_non_finite_probabilities_are_never_written(run_cli, demo_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from aicoss_cli.base.files import read_safetensors

    from helpers import save_random_checkpoint

    path = save_random_checkpoint(tmp_path / "nan.safetensors", demo_root)
    tensors, meta = load_file(str(path)), read_safetensors(path, tensors=False)[1]
    tensors = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    result = run_cli("predict", path, "--out", tmp_path / "p.csv")
    assert_one_line_error(result, str(path), "nothing written", "not finite", "TEST_")
    assert not (tmp_path / "p.csv").exists()


def test_a_weak_ensemble_note_names_the_best_member():
    from aicoss_cli.infer.ensemble import MemberReport, weaker_than_best

    members = [MemberReport("a.safetensors", "x", 32, "none", 0.5, 0.61, None),
               MemberReport("b.safetensors", "x", 32, "none", 0.5, 0.42, None)]
    note = weaker_than_best("equal", 0.55, members)
    assert "0.5500" in note and "a.safetensors (0.6100)" in note and "--weights auto" in note
    assert weaker_than_best("spec", 0.55, members) is not None
    assert weaker_than_best("equal", 0.61, members) is None and weaker_than_best("auto", 0.55, members) is None


def test_the_ensemble_says_when_equal_weights_lose_to_a_member(run_cli, two_members, tmp_path):
    import json

    result = run_cli("ensemble", *two_members, "--out", tmp_path / "e.csv", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    below = report["val_map"] < max(m["val_map"] for m in report["members"])
    assert below == any("below its best member" in n for n in report["notes"]), report


def test_auto_weights_on_a_val_split_too_small_to_fit_fall_back_to_equal(run_cli, demo_root, tmp_path):
    import shutil

    from helpers import save_random_checkpoint

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines[:11]) + "\n")  # 10 rows: a val split of 1 image
    members = [save_random_checkpoint(tmp_path / f"m{i}.safetensors", data, seed=i, val_fraction=0.1) for i in range(2)]
    result = run_cli("ensemble", *members, "--weights", "auto", "--out", tmp_path / "e.csv", "--data", data)
    assert result.code == 0, result.stderr
    assert "--weights auto falls back to equal weights" in result.stdout and "1 images" in result.stdout
    assert (tmp_path / "e.csv").is_file()


# --------------------------------------------------------------------------- 24: import-weights


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
