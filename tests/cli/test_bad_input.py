"""Bad input is caught before any compute: each case runs the real CLI and must give exit code 2,
one line naming the file / key / row and the fix, no traceback, and nothing written."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

RECIPE = """\
name = "bad"
[model]
arch = "tiny_convnet"
img_size = 32
[loss]
name = "bce"
[optim]
epochs = 1
batch_size = 32
[data]
root = "{root}"
val_fraction = 0.2
[runtime]
device = "cpu"
num_workers = 0
precision = "fp32"
"""


@dataclass
class Case:
    """`setup(world)` damages the world and returns the CLI arguments; `expected` must all appear."""

    name: str
    setup: Callable[["World"], list]
    expected: tuple[str, ...]


class World:
    def __init__(self, tmp: Path, demo_root: Path, checkpoint: Path):
        self.tmp = tmp
        self.data = tmp / "data"
        shutil.copytree(demo_root, self.data)
        self.recipe = tmp / "recipe.toml"
        self.recipe.write_text(RECIPE.format(root=self.data))
        self.out = tmp / "out"
        self.checkpoint = tmp / "best.safetensors"
        shutil.copy(checkpoint, self.checkpoint)

    def train(self, *extra) -> list:
        return ["train", self.recipe, "--out", self.out, *extra]

    def edit(self, old: str, new: str) -> None:
        self.recipe.write_text(self.recipe.read_text().replace(old, new, 1))

    def csv(self, name: str, old: str, new: str) -> None:
        path = self.data / name
        path.write_text(path.read_text().replace(old, new, 1))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _torch_save_other_classes(w: World) -> Path:
    import torch

    from aicoss_cli.models import build_model

    path = w.tmp / "other.pt"
    torch.save(build_model("tiny_convnet", 3).state_dict(), path)
    return path


CASES = [
    Case("toml syntax", lambda w: (w.edit("[optim]", "[optim"), w.train())[1], ("recipe.toml", "TOML syntax error", "line")),
    Case("unknown key", lambda w: (w.edit("epochs = 1", "epoch = 1"), w.train())[1],
         ("recipe.toml", "unknown key [optim] epoch", "did you mean 'epochs'")),
    Case("wrong type", lambda w: (w.edit("epochs = 1", 'epochs = "ten"'), w.train())[1],
         ("recipe.toml", "[optim] epochs", '"ten"')),
    Case("lr <= 0", lambda w: w.train("--set", "optim.lr=0"), ("[optim] lr", "greater than 0", "got 0")),
    Case("val_fraction >= 1", lambda w: w.train("--set", "data.val_fraction=1.0"), ("[data] val_fraction", "less than 1")),
    Case("val_fraction <= 0", lambda w: w.train("--set", "data.val_fraction=0"), ("[data] val_fraction", "greater than 0")),
    Case("batch size 0", lambda w: w.train("--set", "optim.batch_size=0"), ("[optim] batch_size", "greater than or equal to 1")),
    Case("unknown arch", lambda w: w.train("--set", "model.arch=tresnet_xl_mldecodr"),
         ("[model] arch", "'tresnet_xl_mldecodr'", "did you mean", "'tresnet_xl_mldecoder'")),
    Case("unknown loss", lambda w: w.train("--set", "loss.name=two_wya"), ("[loss]", "'two_wya'", "two_way")),
    Case("missing data root", lambda w: w.train("--data", w.tmp / "nowhere"),
         ("nowhere", "data folder not found", "--data DIR")),
    Case("missing csv", lambda w: ((w.data / "train.csv").unlink(), w.train())[1], ("train.csv", "not found")),
    Case("csv without img_path", lambda w: (w.csv("train.csv", "img_path", "path"), w.train())[1],
         ("train.csv", "missing column 'img_path'", "img_id,img_path first")),
    Case("label outside -1/0/1", lambda w: (w.csv("train.csv", ",1,", ",2,"), w.train())[1],
         ("train.csv", "row 2", "label '2'", "-1, 0, 1")),
    Case("duplicate img_id", lambda w: (w.csv("train.csv", "TRAIN_00001,", "TRAIN_00000,"), w.train())[1],
         ("train.csv", "duplicate img_id 'TRAIN_00000'", "rows 2, 3", "must be unique")),
    Case("missing images", lambda w: ([(w.data / "train" / f"TRAIN_0000{i}.jpg").unlink() for i in (3, 5)], w.train())[1],
         ("train.csv", "2 of 240 images are missing", "train/TRAIN_00003.jpg", "check img_path")),
    Case("truncated jpeg", lambda w: (truncate(w.data / "train" / "TRAIN_00009.jpg"), w.train())[1],
         ("train.csv", "TRAIN_00009.jpg", "truncated", "replace or remove")),
    Case("not an image", lambda w: ((w.data / "test" / "TEST_00002.jpg").write_bytes(b"<html>"), w.train())[1],
         ("test.csv", "TEST_00002.jpg", "unreadable")),
    Case("path outside the root", lambda w: (w.csv("train.csv", "./train/TRAIN_00004.jpg", "../../etc/passwd"), w.train())[1],
         ("train.csv", "row 6", "'../../etc/passwd'", "outside the data root")),
    Case("test csv vs sample submission", lambda w: (w.csv("test.csv", "TEST_00005,", "TEST_99999,"), w.train())[1],
         ("test.csv", "does not match sample_submission.csv", "TEST_99999")),
    Case("set unknown key", lambda w: w.train("--set", "runtime.workers=2"),
         ("--set runtime.workers=2", "unknown key", "did you mean 'runtime.num_workers'")),
    Case("resume a folder that is not a run", lambda w: ["train", "--resume", w.data],
         ("not an aicoss run folder", "--resume takes a folder written by `aicoss train`")),
    Case("batch not divisible", lambda w: w.train("--set", "optim.grad_accumulation=3"),
         ("[optim]", "batch_size (32) must be divisible by grad_accumulation (3)")),
    Case("prior csv of other classes", lambda w: ((w.tmp / "p.csv").write_text("Classes,avg_pred\nx,0.1\n"),
                                                   w.train("--set", "loss.name=pasl", "--set", f"loss.prior={w.tmp / 'p.csv'}"))[1],
         ("p.csv", "'digit_0'")),
    Case("pretrained file missing", lambda w: w.train("--set", f"model.pretrained={w.tmp / 'nope.pth'}"),
         ("nope.pth",)),
    Case("truncated checkpoint", lambda w: (truncate(w.checkpoint), ["predict", w.checkpoint, "--data", w.data, "--out", w.out / "p.csv"])[1],
         ("best.safetensors", "truncated or corrupt")),
    Case("checkpoint of another class count", lambda w: ["import-weights", _torch_save_other_classes(w), "--arch", "tiny_convnet",
                                                         "--classes", w.data / "train.csv", "--out", w.out / "x.safetensors"],
         ("other.pt", "do not fit", "10 classes", "shape mismatch")),
    Case("checkpoint of another arch", lambda w: ["import-weights", w.checkpoint, "--arch", "resnet50", "--classes",
                                                  w.data / "train.csv", "--out", w.out / "x.safetensors"],
         ("best.safetensors", "do not fit arch 'resnet50'", "missing keys")),
    Case("predict on data of other classes", lambda w: (w.csv("sample_submission.csv", "digit_3", "digit_x"),
                                                        ["predict", w.checkpoint, "--data", w.data, "--out", w.out / "p.csv"])[1],
         ("sample_submission.csv", "class columns")),
]


@pytest.fixture
def trained_checkpoint(ensemble_runs) -> Path:
    """One tiny trained checkpoint for the cases that need one (World copies it)."""
    return ensemble_runs["a32"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, run_cli, demo_root, trained_checkpoint, tmp_path):
    world = World(tmp_path, demo_root, trained_checkpoint)
    args = case.setup(world)
    before = snapshot(tmp_path)
    result = run_cli(*args)
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for part in case.expected:
        assert part in lines[0], (part, lines[0])
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    assert not world.out.exists()


def test_the_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20
