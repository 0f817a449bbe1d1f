"""Recipes: validation, error messages that name the file, key or --set, finite numbers, bounded seeds,
--set overrides, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicoss_cli.base.errors import UserError
from aicoss_cli.recipe import load_recipe, recipe_diff, recipe_from_toml, recipe_to_toml, resolve_recipe

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
name = "row"
[model]
arch = "resnet18_mldecoder"
[loss]
name = "PartialSelectiveLoss"
prior = "labels"
[optim]
lr = 3e-4
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_follow_the_seed(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.optim.epochs == 10 and recipe.optim.min_lr == 1e-6 and recipe.optim.weight_decay == 1e-5
    assert recipe.data.val_fraction == 0.1 and recipe.data.split_seed == 78
    assert recipe.augment.policy == "weak" and recipe.augment.magnitude == 9 and recipe.augment.cutout_factor == 0.5


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("lr = 3e-4", "lrr = 3e-4"), ["recipe.toml", "[optim] lrr", "did you mean 'lr'"]),
        (GOOD.replace("lr = 3e-4", "lr = -3e-4"), ["[optim] lr", "greater than 0", "-0.0003"]),
        (GOOD.replace("lr = 3e-4", 'lr = "fast"'), ["[optim] lr", '"fast"']),
        (GOOD + "[data]\nval_fraction = 1.5\n", ["[data] val_fraction", "less than 1", "1.5"]),
        (GOOD.replace("lr = 3e-4", "batch_size = 0"), ["[optim] batch_size", "0"]),
        (GOOD.replace("lr = 3e-4", "lr = 1e-6\nmin_lr = 1e-3"), ["[optim]", "min_lr", "must not exceed lr"]),
        (GOOD + "[augment]\npolicy = \"medium\"\n", ["[augment] policy", "weak", "strong", '"medium"']),
        (GOOD.replace('prior = "labels"', "prior = true"), ["[loss] prior", "ambiguous"]),
        (GOOD.replace('arch = "resnet18_mldecoder"', 'arch = "tresnet_xl_mldecodr"'),
         ["[model] arch", "tresnet_xl_mldecoder"]),
        (GOOD.replace('name = "PartialSelectiveLoss"', 'name = "focal"'), ["[loss]", "unknown loss name 'focal'", "two_way"]),
        (GOOD.replace('prior = "labels"', 'prior = "labels"\ntp = 2.0'), ["[loss] tp does not apply", "partial_selective"]),
        ('name = "x"\n', ["[model]", "required"]),
        ("name = \"x\"\n[model\narch = 1\n", ["TOML syntax error"]),
        (GOOD + "[runtime]\ndevice = \"gpu\"\n", ["[runtime] device", '"gpu"']),
    ],
    ids=["unknown key", "lr<=0", "wrong type", "val_fraction>1", "batch 0", "min_lr>lr", "bad policy",
         "prior true", "unknown arch", "unknown loss", "param of another loss", "missing section", "syntax",
         "bad device"],
)
def test_bad_recipes_name_file_key_and_value(tmp_path, text, expected):
    message = error_of(write(tmp_path, text))
    for part in expected:
        assert part in message, (part, message)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.toml")


def test_set_overrides_parse_with_the_field_type(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["optim.lr=1e-4", "optim.epochs=3", "model.pretrained=false", "data.root=123",
                                "model.pretrained=weights/backbone.pth", "augment.policy=strong", "name=other"])
    assert recipe.optim.lr == 1e-4 and recipe.optim.epochs == 3
    assert recipe.data.root == "123"  # a str field keeps the text, even when it looks like a number
    assert recipe.model.pretrained == "weights/backbone.pth"
    assert recipe.augment.policy == "strong" and recipe.name == "other"
    assert load_recipe(path, ["model.pretrained=false"]).model.pretrained is False
    assert load_recipe(path, ["runtime.channels_last=true"]).runtime.channels_last is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", ["--set optim.lrr=1", "did you mean 'optim.lr'"]),
        ("nosection.lr=1", ["unknown key 'nosection.lr'"]),
        ("optim=1", ["is a section"]),
        ("optim.lr", ["section.key=value"]),
        ("optim.lr=-1", ["[optim] lr", "greater than 0"]),
    ],
)
def test_bad_overrides_are_named(tmp_path, override, expected):
    message = error_of(write(tmp_path, GOOD), [override])
    for part in expected:
        assert part in message, (part, message)


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    recipe = resolve_recipe(load_recipe(write(tmp_path, GOOD)), data_root="data/x")
    assert recipe.loss.name == "partial_selective"  # the seed's spelling resolves to the canonical name
    assert recipe.loss.gamma_unann == 2 and recipe.loss.likelihood_topk == 5  # the loss's defaults made explicit
    assert recipe.model.img_size == 224 and recipe.data.root == "data/x"
    again = recipe_from_toml(recipe_to_toml(recipe), "stored")
    assert again == recipe
    assert recipe_diff(recipe, again) == []


def test_recipe_diff_names_each_change(tmp_path):
    a = load_recipe(write(tmp_path, GOOD))
    b = load_recipe(write(tmp_path, GOOD), ["optim.lr=1e-3", "data.split=stratified"])
    assert recipe_diff(a, b) == ["[optim] lr: 0.0003 -> 0.001", "[data] split: 'random' -> 'stratified'"]


def test_bundled_recipes_all_validate():
    files = sorted((ROOT / "recipes").glob("*.toml"))
    assert files, "recipes/ is empty"
    for path in files:
        resolve_recipe(load_recipe(path))


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
