"""Recipes: validation, error messages that name the file and key, --set overrides, round trips."""

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
