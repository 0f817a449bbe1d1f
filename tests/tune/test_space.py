"""The search space: the default space, a space file that extends it, the docs' example, a bundled
recipe by name."""

from __future__ import annotations

from helpers import ROOT, tune_recipe


def test_the_default_space_searches_the_loss_only_where_labels_are_missing(demo_root, demo_root_partial, tmp_path):
    from aicoss_cli.tune.space import TrialRecipes, load_space

    recipe = tune_recipe(tmp_path, demo_root)
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
    recipes = TrialRecipes(tune_recipe(tmp_path, demo_root), data=demo_root, epochs=3)
    recipes.inspect_data()
    loaded = load_space(space, recipes)
    params = {p.key: p for p in loaded.params}
    assert params["augment.policy"].choices == ("none", "weak")
    assert "optim.lr" in params and params["optim.clip_grad_norm"].kind == "categorical"
    assert loaded.settings.sampler == "random" and loaded.min_epochs == 2


def test_the_readme_space_example_is_accepted(demo_root, tmp_path):
    from aicoss_cli.tune.space import TrialRecipes, load_space

    readme = (ROOT / "docs" / "tune.md").read_text()
    block = readme.split("**`--space SPACE.toml`**", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    space = tmp_path / "space.toml"
    space.write_text(block)
    recipes = TrialRecipes(ROOT / "recipes" / "starter.toml", data=demo_root, epochs=3)
    recipes.inspect_data()
    loaded = load_space(space, recipes)
    keys = [p.key for p in loaded.params]
    assert "optim.weight_decay" in keys and "model.arch" in keys and loaded.min_epochs == 2


def test_tune_takes_a_bundled_recipe_by_name_as_train_does(demo_root):
    from aicoss_cli.recipe import bundled_recipes
    from aicoss_cli.tune import TrialRecipes

    recipes = TrialRecipes("starter", data=demo_root, epochs=1)
    assert recipes.path == bundled_recipes() / "starter.toml" and recipes.base.name == "starter"
