"""Distillation (`train.distill`): the loss against the formula, the teacher against `aicoss
ensemble`, exact resume of a distilled run, and the optional [distill] recipe table."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import EXACT, read_csv, save_random_checkpoint


def bce_by_hand(s: np.ndarray, q: np.ndarray) -> np.ndarray:
    """−q·log σ(s) − (1 − q)·log(1 − σ(s)), entry by entry, in float64."""
    p = 1.0 / (1.0 + np.exp(-s))
    return -(q * np.log(p) + (1.0 - q) * np.log(1.0 - p))


# --------------------------------------------------------------------------- the loss


S = np.array([[1.5, -0.5, 0.2], [-2.0, 0.7, 3.0], [0.3, -1.2, 0.9], [2.2, 0.1, -0.4]])
Y = np.array([[1, 0, -1], [0, 1, 1], [-1, -1, -1], [1, -1, 0]], dtype=float)  # row 2: an unlabeled image
Q = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.7], [0.4, 0.3, 0.95], [0.85, 0.5, 0.05]])
LABELED = [0, 1, 3]


def label_term_by_hand(loss: str) -> float:
    """The recipe loss on rows 0, 1, 3 only: bce averages its annotated entries; asl (γ = 0, no
    clip) sums them; P-ASL (γ = 0, α = 1, no clip, partial_mode "negative") sums every entry of
    those rows, counting −1 as a negative (so the unlabeled row must be kept out by its row)."""
    s, y = S[LABELED], Y[LABELED]
    if loss == "partial_selective":
        return float(bce_by_hand(s, (y == 1).astype(float)).sum())
    known = y != -1
    per_entry = bce_by_hand(s, np.clip(y, 0, 1))[known]
    return float(per_entry.mean() if loss == "bce" else per_entry.sum())


@pytest.mark.parametrize("loss, params", [
    ("bce", {}),
    ("asl", {"gamma_pos": 0.0, "gamma_neg": 0.0, "clip": 0.0}),
    ("partial_selective", {"gamma_pos": 0.0, "gamma_neg": 0.0, "gamma_unann": 0.0, "clip": 0.0,
                           "partial_mode": "negative"}),
])
@pytest.mark.parametrize("weight", [0.0, 0.5, 0.9, 1.0])
def test_distill_loss_matches_the_formula_in_float64(loss, params, weight):
    from aicoss_cli.losses import build_loss
    from aicoss_cli.train.distill import distill_loss

    loss_fn = build_loss(loss, **params)
    teacher = bce_by_hand(S, Q)  # every entry, the unlabeled row and the −1 labels included
    teacher_term = teacher.mean() if loss == "bce" else teacher.sum()
    expected = weight * teacher_term + (1 - weight) * label_term_by_hand(loss)
    got = distill_loss(torch.tensor(S), torch.tensor(Y), torch.tensor(Q), loss_fn, weight,
                       labeled=torch.tensor(LABELED))
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_distill_loss_of_a_batch_without_labelled_rows_is_the_teacher_term_alone():
    from aicoss_cli.losses import build_loss
    from aicoss_cli.train.distill import distill_loss

    got = distill_loss(torch.tensor(S), torch.tensor(Y), torch.tensor(Q), build_loss("zlpr"), 0.5,
                       labeled=torch.tensor([], dtype=torch.long))
    assert float(got) == pytest.approx(0.5 * bce_by_hand(S, Q).mean(), rel=1e-12)


def test_the_gradient_pulls_the_student_toward_the_teacher_on_unlabeled_rows():
    from aicoss_cli.losses import build_loss
    from aicoss_cli.train.distill import distill_loss

    s = torch.tensor(S, requires_grad=True)
    distill_loss(s, torch.tensor(Y), torch.tensor(Q), build_loss("bce"), 0.9, labeled=torch.tensor(LABELED)).backward()
    # row 2 has no label: only the teacher term moves it, d/ds = 0.9 · (σ(s) − q) / (B·K)
    expected = 0.9 * (1 / (1 + np.exp(-S[2])) - Q[2]) / S.size
    assert np.allclose(s.grad[2].numpy(), expected, rtol=1e-12)


# --------------------------------------------------------------------------- the teacher


def teacher_spec(folder: Path, root: Path, members: list[tuple[int, int, float]]) -> Path:
    """An ENSEMBLE.toml of random checkpoints: (seed, img_size, weight) each."""
    lines = []
    for seed, size, weight in members:
        path = save_random_checkpoint(folder / f"t{seed}_{size}.safetensors", root, seed=seed, img_size=size)
        lines.append(f'[[member]]\npath = "{path.name}"\nweight = {weight}\n')
    spec = folder / "teachers.toml"
    spec.write_text("\n".join(lines))
    return spec


def distill_recipe(write_recipe, root: Path, teachers: list[Path], mode: str, epochs: int = 1,
                   unlabeled: str = '["test"]', name: str = "tiny.toml") -> Path:
    extra = (f"\n[distill]\nteachers = [{', '.join(repr(str(t)) for t in teachers)}]\nmode = \"{mode}\"\n"
             f"unlabeled = {unlabeled}\n")
    return write_recipe(root, epochs=epochs, extra=extra, name=name)


def resolved(path: Path):
    from aicoss_cli.recipe import load_recipe, resolve_recipe

    return resolve_recipe(load_recipe(path))


def test_cached_teacher_probabilities_are_aicoss_ensembles(run_cli, demo_root, write_recipe, tmp_path):
    """Members of two input sizes, spec weights 1 and 3: the cache holds, for every test image,
    the probabilities `aicoss ensemble` writes, and distill.json the val mAP it reports."""
    import json

    from aicoss_cli.base.files import read_safetensors
    from aicoss_cli.train.trainer import Trainer

    spec = teacher_spec(tmp_path, demo_root, [(1, 32, 1.0), (2, 48, 3.0)])
    ensemble = run_cli("ensemble", "--spec", spec, "--data", demo_root, "--out", tmp_path / "ens.csv")
    assert ensemble.code == 0, ensemble.stderr
    _, test_ids, expected = read_csv(tmp_path / "ens.csv")
    result = Trainer(resolved(distill_recipe(write_recipe, demo_root, [spec], "cached")), tmp_path / "runs").run()
    tensors, meta = read_safetensors(result.run_dir / "distill_cache.safetensors")
    ids = json.loads(meta["ids"])
    probs = tensors["probs"].numpy()
    cached = probs[[ids.index(i) for i in test_ids]]
    assert np.allclose(cached, expected, atol=2e-6, rtol=0), np.abs(cached - expected).max()
    record = json.loads((result.run_dir / "distill.json").read_text())
    reported = json.loads((tmp_path / "ens.json").read_text())
    assert record["val_map"] == pytest.approx(reported["val_map"], abs=1e-9)
    assert [m["weight"] for m in record["members"]] == [0.25, 0.75]
    assert [m["val_map"] for m in record["members"]] == pytest.approx([m["val_map"] for m in reported["members"]])


def test_online_teacher_on_the_clean_images_is_aicoss_ensembles_weighted_mean(run_cli, demo_root, write_recipe,
                                                                               tmp_path):
    """Online, the teacher sees the student's uint8 batch: on the clean test images (members at the
    student's size) it gives the weighted mean `aicoss ensemble` writes."""
    from aicoss_cli.base.runtime import make_runtime
    from aicoss_cli.data.images import decode_batch
    from aicoss_cli.data.tables import read_test
    from aicoss_cli.recipe import DistillConfig
    from aicoss_cli.train.distill import _build
    from aicoss_cli.train.prepare import prepare_data

    spec = teacher_spec(tmp_path, demo_root, [(1, 32, 1.0), (2, 32, 3.0)])
    assert run_cli("ensemble", "--spec", spec, "--data", demo_root, "--out", tmp_path / "ens.csv").code == 0
    _, test_ids, expected = read_csv(tmp_path / "ens.csv")

    data = prepare_data(resolved(write_recipe(demo_root)))
    teacher = _build(DistillConfig(teachers=[str(spec)]), False, data, make_runtime("cpu", "fp32", 0), 16, None, [], None)
    test = read_test(demo_root)
    images = decode_batch([test.paths[test.ids.index(i)] for i in test_ids], [32])[0][0]
    assert np.allclose(teacher.online(images).numpy(), expected, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------- resume


class InterruptAt:
    """A callback that presses Ctrl-C once the run has done `step` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_run_start(self, trainer): ...

    def on_epoch_end(self, trainer, row): ...

    def on_run_end(self, trainer, result): ...

    def on_log(self, trainer, values):
        if values["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_resume_of_a_distilled_run_is_exact(demo_root, write_recipe, tmp_path, mode, monkeypatch):
    """Stopped mid-epoch 2 by Ctrl-C and resumed (`aicoss train --resume`, no flag): the same
    weights, metrics, submission and train state as a run that was never stopped. Cached, the
    resume reads the teachers' probabilities and record back and loads no teacher."""
    from aicoss_cli.base.errors import TrainingStopped
    from aicoss_cli.models.checkpoint import load_checkpoint
    from aicoss_cli.train.state import resolve_resume
    from aicoss_cli.train.trainer import Trainer

    spec = teacher_spec(tmp_path, demo_root, [(1, 32, 1.0), (2, 48, 2.0)])
    path = distill_recipe(write_recipe, demo_root, [spec], mode, epochs=2)
    text = path.read_text()
    path.write_text(text[:text.index("[runtime]")] + EXACT.lstrip() + text[text.index("[distill]") - 1:])
    straight = Trainer(resolved(path), tmp_path / "straight").run()
    steps = (192 + 40) // 32  # per epoch: the train rows (80 % of 240) and the test images, batch 32
    with pytest.raises(TrainingStopped):
        Trainer(resolved(path), tmp_path / "stopped", callbacks=[InterruptAt(steps + 2)]).run()
    run_dir = next((tmp_path / "stopped").glob("*/*"))
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
    if mode == "cached":
        monkeypatch.setattr("aicoss_cli.train.distill.load_members",
                            lambda *args, **kwargs: pytest.fail("a cached resume loaded its teachers"))
    resumed = Trainer(None, resume=resolve_resume(run_dir)).run()
    a, b = load_checkpoint(straight.run_dir / "last.safetensors"), load_checkpoint(resumed.run_dir / "last.safetensors")
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1].extra["distill"] == b[1].extra["distill"]
    assert [r["val_map"] for r in straight.rows] == [r["val_map"] for r in resumed.rows]
    assert [r["train_loss"] for r in straight.rows] == [r["train_loss"] for r in resumed.rows]
    assert (straight.run_dir / "submission.csv").read_text() == (resumed.run_dir / "submission.csv").read_text()


# --------------------------------------------------------------------------- the recipe table


def test_a_recipe_with_a_distill_table_round_trips_and_one_without_writes_none(tmp_path):
    from aicoss_cli.recipe import load_recipe, recipe_diff, recipe_from_toml, recipe_to_toml

    base = 'name = "s"\n[model]\narch = "tiny_convnet"\n'
    path = tmp_path / "r.toml"
    path.write_text(base)
    plain = load_recipe(path)
    assert plain.distill is None and "distill" not in recipe_to_toml(plain)
    path.write_text(base + '[distill]\nteachers = ["a.safetensors", "runs/x/1"]\nunlabeled = "test"\n')
    with_table = load_recipe(path, ["distill.weight=0.5"])
    assert with_table.distill.teachers == ["a.safetensors", "runs/x/1"]
    assert with_table.distill.unlabeled == ["test"] and with_table.distill.mode == "online"
    assert recipe_from_toml(recipe_to_toml(with_table), "x") == with_table
    assert recipe_diff(with_table, recipe_from_toml(recipe_to_toml(with_table), "x")) == []
    assert any(c.startswith("[distill]: None -> ") for c in recipe_diff(plain, with_table))
    with_table.distill.weight = 0.9
    assert recipe_diff(load_recipe(path, ["distill.weight=0.5"]), with_table) == ["[distill] weight: 0.5 -> 0.9"]


@pytest.mark.parametrize("text, needle", [
    ('[distill]\nteachers = ["a"]\nweight = 1.5\n', "[distill] weight"),
    ('[distill]\nteachers = []\n', "[distill] teachers"),
    ('[distill]\nteachers = ["a"]\nmode = "lazy"\n', "[distill] mode"),
    ('[distill]\nteacher = ["a"]\n', "unknown key [distill] teacher; did you mean 'teachers'?"),
])
def test_a_bad_distill_table_names_the_key(tmp_path, text, needle):
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text('name = "s"\n[model]\narch = "tiny_convnet"\n' + text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_tune_never_searches_the_distill_table(demo_root, write_recipe, tmp_path):
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.tune.space import TrialRecipes, load_space

    space = tmp_path / "space.toml"
    space.write_text("[distill.weight]\nlow = 0.5\nhigh = 1.0\n")
    with pytest.raises(UserError) as info:
        load_space(space, TrialRecipes(write_recipe(demo_root)))
    assert "[distill] cannot be searched" in str(info.value)


def test_aicoss_distill_options_reach_the_table_as_set_items_whatever_the_path(tmp_path):
    from aicoss_cli.recipe import load_recipe
    from aicoss_cli.train.distill import distill_overrides

    path = tmp_path / "r.toml"
    path.write_text('name = "s"\n[model]\narch = "tiny_convnet"\n[distill]\nteachers = ["old"]\nweight = 0.3\n')
    odd = ['runs/a "quoted" é/1', "b\\c.safetensors"]
    recipe = load_recipe(path, distill_overrides(odd, None, "cached", ["test", "x,y.csv"]))
    assert recipe.distill.teachers == odd and recipe.distill.weight == 0.3
    assert recipe.distill.mode == "cached" and recipe.distill.unlabeled == ["test", "x,y.csv"]
