"""Checkpoints: round trip with metadata, range-checked metadata, loading without random init, clear errors on
damaged files."""

from __future__ import annotations

import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.models import build_model
from aicoss_cli.models.checkpoint import (
    CheckpointMeta,
    load_checkpoint,
    model_from_checkpoint,
    read_meta,
    save_checkpoint,
)

from helpers import edit_metadata, save_random_checkpoint


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


@pytest.mark.parametrize("arch, size", [("tiny_convnet", 32), ("resnet18_mldecoder", 32),
                                        ("tf_efficientnet_lite0_mldecoder", 32)])
def test_members_load_without_random_init_and_compute_what_the_checkpoint_model_computes(demo_root, tmp_path, arch,
                                                                                         size):
    """tf_efficientnet_lite0_mldecoder re-normalises its input with non-persistent buffers: built the normal way."""
    from aicoss_cli.models.checkpoint import model_from_checkpoint

    ckpt = save_random_checkpoint(tmp_path / f"{arch}.safetensors", demo_root, arch=arch, img_size=size, seed=4)
    fast, meta = model_from_checkpoint(ckpt)
    slow, _ = model_from_checkpoint(ckpt, skip_init=False)
    assert meta.arch == arch and not fast.training
    assert not any(t.is_meta for t in (*fast.parameters(), *fast.buffers()))
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=0)


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
def test_checkpoint_metadata_is_range_checked(random_checkpoint, key, value, expected):
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.models.checkpoint import read_meta

    edit_metadata(random_checkpoint, **{key: value})
    with pytest.raises(UserError) as info:
        read_meta(random_checkpoint)
    message = str(info.value)
    assert message.startswith(f"{random_checkpoint}: ") and key in message and expected in message, message
    assert "\n" not in message


def test_a_checkpoint_without_a_val_map_or_with_nan_reads_as_unknown(random_checkpoint):
    from aicoss_cli.models.checkpoint import CheckpointMeta, read_meta

    assert read_meta(edit_metadata(random_checkpoint, val_map="")).val_map is None
    assert read_meta(edit_metadata(random_checkpoint, val_map="nan")).val_map is None  # as older runs wrote it
    assert CheckpointMeta("tiny_convnet", 32, ["a"], val_map=float("nan")).to_strings()["val_map"] == ""
