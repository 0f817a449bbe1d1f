"""Checkpoints: round trip with metadata, atomic writes, clear errors on damaged files."""

from __future__ import annotations

import os

import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path
from aicoss_cli.models import build_model
from aicoss_cli.models.checkpoint import (
    CheckpointMeta,
    load_checkpoint,
    model_from_checkpoint,
    read_meta,
    save_checkpoint,
)


def meta(**kw) -> CheckpointMeta:
    base = dict(arch="tiny_convnet", img_size=32, classes=["a", "b", "c"], recipe_toml='name = "x"\n', epoch=3,
                val_map=0.8125, split={"kind": "random", "val_fingerprint": "abc"}, prior=[0.1, 0.2, 0.3])
    base.update(kw)
    return CheckpointMeta(**base)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny_convnet", 3)
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, model.state_dict(), meta())
    state, loaded = load_checkpoint(path)
    assert loaded == meta()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    rebuilt, m = model_from_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(rebuilt(x), model(x)) and m.num_classes == 3
    assert read_meta(path).val_map == 0.8125


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["last.safetensors"]


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, build_model("tiny_convnet", 3).state_dict(), meta())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_file_without_aicoss_metadata_points_to_import_weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="import-weights"):
        load_checkpoint(path)


def test_weights_of_another_arch_or_class_count_are_refused(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, build_model("tiny_convnet", 4).state_dict(), meta())  # says 3 classes, holds 4
    with pytest.raises(UserError, match="shape mismatch"):
        model_from_checkpoint(path)
