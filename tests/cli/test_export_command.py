"""`aicoss export` and `OnnxModel`: exported models compute what the PyTorch model computes, say how
to feed them, and bad input or a failed check leaves nothing behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx  # the export extra: installed with the dev environment, so these tests run it
import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.images import decode_batch
from aicoss_cli.data.loading import IMAGENET_MEAN, IMAGENET_STD, normalize
from aicoss_cli.data.tables import read_test
from aicoss_cli.models.checkpoint import model_from_checkpoint, read_meta

from helpers import assert_one_line_error, leftovers, only_run_dir, save_random_checkpoint


def demo_images(root: Path, size: int, n: int = 5) -> torch.Tensor:
    """The first n test images of a data root, decoded and normalised as predict does."""
    batches, error = decode_batch(read_test(root).paths[:n], [size])
    assert not error, error
    return normalize(batches[0]).contiguous()


def pytorch_probabilities(checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    """The reference: the checkpoint's model in eager PyTorch, sigmoid of its logits."""
    model, _ = model_from_checkpoint(checkpoint)
    with torch.inference_mode():
        return torch.sigmoid(model(x))


def export_ok(run_cli, *args) -> str:
    result = run_cli("export", *map(str, args))
    assert result.code == 0, (result.stdout, result.stderr)
    assert "largest difference" in result.stdout and ": ok" in result.stdout, result.stdout
    return result.stdout


# --------------------------------------------------------------------------- ONNX of a trained run


def test_onnx_of_a_trained_run_matches_pytorch_and_carries_the_checkpoint_metadata(run_cli, demo_root, write_recipe,
                                                                                    tmp_path):
    from aicoss_cli.infer.onnx_model import OnnxModel

    assert run_cli("train", write_recipe(demo_root, epochs=2), "--out", tmp_path / "runs").code == 0
    checkpoint = only_run_dir(tmp_path / "runs") / "best.safetensors"
    stdout = export_ok(run_cli, checkpoint, "--data", demo_root)
    assert f"4 images of {demo_root / 'test.csv'}" in stdout  # the check ran on real images

    path = checkpoint.with_name("best.onnx")  # the default: beside the checkpoint
    model = OnnxModel.load(path)
    source = read_meta(checkpoint)
    assert model.path == path and model.batch is None
    for key in ("arch", "img_size", "classes", "recipe_toml", "split", "epoch", "val_map"):
        assert getattr(model.meta, key) == getattr(source, key), key
    assert model.meta.split["val_fingerprint"]  # predict --split val can verify the split from the file alone

    x = demo_images(demo_root, source.img_size, n=7)
    got = model.probabilities(x)
    assert got.dtype == torch.float32 and got.shape == (7, len(source.classes))
    torch.testing.assert_close(got, pytorch_probabilities(checkpoint, x), rtol=0, atol=1e-4)

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["mean"]) == list(IMAGENET_MEAN) and json.loads(props["std"]) == list(IMAGENET_STD)
    assert props["source_checkpoint"] == str(checkpoint) and props["precision"] == "fp32"
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["probabilities"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, source.img_size, source.img_size]


def test_fixed_batch_onnx_has_that_batch_and_onnx_model_splits_and_pads(run_cli, random_checkpoint, demo_root,
                                                                        tmp_path):
    from aicoss_cli.infer.onnx_model import OnnxModel

    out = tmp_path / "fixed.onnx"
    export_ok(run_cli, random_checkpoint, "--batch", "3", "--out", out)
    model = OnnxModel.load(out)
    assert model.batch == 3
    assert [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim] == [3, 3, 32, 32]
    x = demo_images(demo_root, 32, n=7)  # 3 + 3 + 1 padded
    torch.testing.assert_close(model.probabilities(x), pytorch_probabilities(random_checkpoint, x), rtol=0, atol=1e-4)


def test_fp16_onnx_holds_half_weights_and_stays_within_1e_2(run_cli, random_checkpoint, demo_root, tmp_path):
    from aicoss_cli.infer.onnx_model import OnnxModel

    out = tmp_path / "half.onnx"
    stdout = export_ok(run_cli, random_checkpoint, "--fp16", "--out", out, "--data", demo_root)
    assert "fp16" in stdout
    proto = onnx.load(str(out))
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4]  # the conv kernels
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = demo_images(demo_root, 32)
    got, want = OnnxModel.load(out).probabilities(x), pytorch_probabilities(random_checkpoint, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    assert not torch.equal(got, want)  # it did run in half precision


def test_class_names_with_quotes_commas_and_emoji_survive_the_metadata(run_cli, demo_root, tmp_path):
    from aicoss_cli.infer.onnx_model import OnnxModel

    names = ['a,b', 'say "hi"', "🛰️ orbit", "tab\there", "back\\slash", "ünïcode", "x'y", "semi;colon", "<b>", "0"]
    checkpoint = save_random_checkpoint(tmp_path / "odd.safetensors", demo_root, classes=names)
    export_ok(run_cli, checkpoint)
    assert OnnxModel.load(tmp_path / "odd.onnx").meta.classes == names


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_reloads_with_its_metadata_and_a_dynamic_batch(run_cli, random_checkpoint, demo_root):
    export_ok(run_cli, random_checkpoint, "--format", "torchscript", "--data", demo_root)
    extra = {"aicoss.json": ""}
    module = torch.jit.load(str(random_checkpoint.with_suffix(".pt")), _extra_files=extra)
    meta = json.loads(extra["aicoss.json"])
    assert meta["arch"] == "tiny_convnet" and json.loads(meta["classes"]) == read_meta(random_checkpoint).classes
    x = demo_images(demo_root, 32, n=5)  # traced at batch 2
    with torch.inference_mode():
        got = module(x)
    torch.testing.assert_close(got, pytorch_probabilities(random_checkpoint, x), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- refusals and failures


def test_an_existing_output_is_never_overwritten_without_overwrite(run_cli, random_checkpoint):
    out = random_checkpoint.with_suffix(".onnx")
    out.write_bytes(b"user's file")
    assert_one_line_error(run_cli("export", random_checkpoint), str(out), "--overwrite")
    assert out.read_bytes() == b"user's file"
    export_ok(run_cli, random_checkpoint, "--overwrite")
    assert out.read_bytes() != b"user's file"
    assert_one_line_error(run_cli("export", random_checkpoint, "--out", random_checkpoint, "--overwrite"),
                          "the checkpoint itself")
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("args, needles", [
    (["--format", "tflite"], ["--format", "onnx, torchscript, safetensors-timm"]),
    (["--batch", "0"], ["--batch", "dynamic"]),
    (["--batch", "many"], ["--batch", "'many'"]),
    (["--opset", "3"], ["--opset"]),
    (["--format", "torchscript", "--opset", "17"], ["--opset applies to --format onnx"]),
    (["--format", "safetensors-timm"], ["tiny_convnet", "not a timm model", "--format onnx"]),
])
def test_bad_options_are_one_line_errors_and_write_nothing(run_cli, random_checkpoint, args, needles):
    before = sorted(p.name for p in random_checkpoint.parent.iterdir())
    assert_one_line_error(run_cli("export", random_checkpoint, *args), *needles)
    assert sorted(p.name for p in random_checkpoint.parent.iterdir()) == before


def test_a_missing_checkpoint_or_an_onnx_file_instead_is_a_one_line_error(run_cli, tmp_path):
    assert_one_line_error(run_cli("export", tmp_path / "nope.safetensors"), "nope.safetensors", "not found")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    assert_one_line_error(run_cli("export", tmp_path / "model.onnx"), "model.onnx", "exported model already")


def test_a_failed_check_exits_1_and_leaves_no_file(run_cli, random_checkpoint, monkeypatch):
    """An exporter that writes a slightly different model (here: one weight changed) is caught."""
    from aicoss_cli.export import writer as export

    real = export._export_onnx

    def perturbed(module, *args, **kwargs):
        with torch.no_grad():
            module.model.cls.bias[0] += 0.01  # after the reference was computed
        return real(module, *args, **kwargs)

    monkeypatch.setattr(export, "_export_onnx", perturbed)
    result = run_cli("export", random_checkpoint)
    assert result.code == 1, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "differs from PyTorch by" in message, message
    assert not random_checkpoint.with_suffix(".onnx").exists() and leftovers(random_checkpoint.parent) == []


def test_a_timm_folder_is_replaced_only_with_overwrite_and_only_by_a_checked_one(run_cli, demo_root, tmp_path,
                                                                                 monkeypatch):
    from aicoss_cli.export import writer as export

    checkpoint = save_random_checkpoint(tmp_path / "r18.safetensors", demo_root, arch="resnet18_mldecoder")
    folder = tmp_path / "r18_timm"
    export_ok(run_cli, checkpoint, "--format", "safetensors-timm")
    first = (folder / "model.safetensors").read_bytes()
    assert_one_line_error(run_cli("export", checkpoint, "--format", "safetensors-timm"), str(folder), "--overwrite")

    def broken(path):
        raise RuntimeError("Error(s) in loading state_dict: Missing key(s)")

    with monkeypatch.context() as patch:
        patch.setattr(export, "load_timm", broken)
        result = run_cli("export", checkpoint, "--format", "safetensors-timm", "--fp16", "--overwrite")
    assert result.code == 1 and "timm cannot load the written weights" in result.stderr, result.stderr
    assert (folder / "model.safetensors").read_bytes() == first  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    export_ok(run_cli, checkpoint, "--format", "safetensors-timm", "--fp16", "--overwrite")
    assert len((folder / "model.safetensors").read_bytes()) < 0.6 * len(first)  # now fp16
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_corrupt_truncated_missing_and_foreign_onnx_files_are_one_line_errors(run_cli, random_checkpoint, tmp_path):
    from onnx import TensorProto, helper

    from aicoss_cli.infer.onnx_model import OnnxModel

    export_ok(run_cli, random_checkpoint)
    good = random_checkpoint.with_suffix(".onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 50)
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX model that aicoss did not write
    graph = helper.make_graph([helper.make_node("Sigmoid", ["images"], ["probabilities"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(foreign))
    cases = {truncated: "not a readable ONNX model", garbage: "not a readable ONNX model",
             foreign: "not an aicoss ONNX model", tmp_path / "missing.onnx": "not found"}
    for path, needle in cases.items():
        with pytest.raises(UserError) as info:
            OnnxModel.load(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and needle in message, message


def test_a_missing_export_extra_names_the_pip_command(run_cli, random_checkpoint, monkeypatch):
    from aicoss_cli.infer.onnx_model import OnnxModel

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert_one_line_error(run_cli("export", random_checkpoint), "onnxruntime", "pip install 'aicoss[export]'")
    assert not random_checkpoint.with_suffix(".onnx").exists()
    with pytest.raises(UserError, match=r"pip install 'aicoss\[export\]'"):
        OnnxModel.load(random_checkpoint)
    export_ok(run_cli, random_checkpoint, "--format", "torchscript")  # needs no extra


# --------------------------------------------------------------------------- every backbone family and head


class Family:
    """One random-init checkpoint of an arch, its model loaded once, and demo images at its size."""

    def __init__(self, demo_root: Path, tmp_path: Path, arch: str, size: int, n: int = 3):
        self.data = demo_root
        self.checkpoint = save_random_checkpoint(tmp_path / f"{arch}.safetensors", demo_root, arch=arch, img_size=size)
        self.model, self.meta = model_from_checkpoint(self.checkpoint)
        self.x = demo_images(demo_root, size, n=n)
        with torch.inference_mode():
            self.want = torch.sigmoid(self.model(self.x))

    def check_onnx(self, run_cli) -> None:
        from aicoss_cli.infer.onnx_model import OnnxModel

        export_ok(run_cli, self.checkpoint, "--data", self.data)
        got = OnnxModel.load(self.checkpoint.with_suffix(".onnx")).probabilities(self.x)
        torch.testing.assert_close(got, self.want, rtol=0, atol=1e-4)

    def check_timm(self, run_cli, *, whole: bool, mean: tuple[float, ...], by_file: bool = True) -> None:
        """The folder loads with timm's own loader, the ways a user would (by the weights file with
        config.json's arguments, and by the folder), and computes what the aicoss model's backbone
        (or, for FCN rows, the whole model) computes."""
        import timm

        export_ok(run_cli, self.checkpoint, "--format", "safetensors-timm")
        folder = self.checkpoint.with_name(self.checkpoint.stem + "_timm")
        config = json.loads((folder / "config.json").read_text())
        size = self.meta.img_size
        assert config["aicoss"]["classes"] == self.meta.classes and config["aicoss"]["arch"] == self.meta.arch
        assert config["pretrained_cfg"]["input_size"] == [3, size, size]
        assert config["pretrained_cfg"]["mean"] == pytest.approx(mean)
        assert config.get("label_names") == (self.meta.classes if whole else None)
        models = [timm.create_model(f"local-dir:{folder}", pretrained=True)]
        if by_file:
            overlay = dict(file=str(folder / "model.safetensors"), num_classes=config["num_classes"])
            models.append(timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                            **config["model_args"]))
        renorm = getattr(self.model, "renorm", None)
        inner = renorm(self.x) if renorm is not None else self.x
        with torch.inference_mode():
            want = self.want if whole else self.model.backbone(inner)
            for timm_model in models:
                got = timm_model.eval()(self.x if whole else inner)
                torch.testing.assert_close(torch.sigmoid(got) if whole else got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_resnet50_fcn_exports_to_onnx_torchscript_and_timm_whole(run_cli, demo_root, tmp_path):
    family = Family(demo_root, tmp_path, "resnet50", 32)
    family.check_onnx(run_cli)
    export_ok(run_cli, family.checkpoint, "--format", "torchscript")
    module = torch.jit.load(str(family.checkpoint.with_suffix(".pt")))
    with torch.inference_mode():
        torch.testing.assert_close(module(family.x), family.want, rtol=0, atol=1e-4)
    family.check_timm(run_cli, whole=True, mean=IMAGENET_MEAN)


@pytest.mark.slow
def test_tresnet_mldecoder_exports_to_onnx_and_its_backbone_to_timm(run_cli, demo_root, tmp_path):
    family = Family(demo_root, tmp_path, "tresnet_l_learnable_mldecoder", 32)
    family.check_onnx(run_cli)
    family.check_timm(run_cli, whole=False, mean=IMAGENET_MEAN)


@pytest.mark.slow
def test_cvt_q2l_exports_to_onnx_with_its_attention(run_cli, demo_root, tmp_path):
    family = Family(demo_root, tmp_path, "cvt_q2l", 64)
    family.check_onnx(run_cli)
    assert_one_line_error(run_cli("export", family.checkpoint, "--format", "safetensors-timm"),
                          "not a timm model", "--format onnx")


@pytest.fixture
def narrow_swinv2(monkeypatch) -> str:
    """An arch built by `swinv2`'s own path (`timm_fcn` on timm's swinv2_base_window8_256) with one
    block per stage and narrow widths: the same operations (shifted windows, their attention mask,
    the cosine attention, the fixed input size) in a graph the ONNX optimiser takes seconds over;
    the base model's 24 blocks take it two minutes on 2 CPU cores."""
    from aicoss_cli.models import registry
    from aicoss_cli.models.zoo import timm_fcn

    name = "swinv2_narrow_test"

    def build(num_classes, *, pretrained, img_size, arch):
        return timm_fcn("swinv2_base_window8_256", 256, num_classes, pretrained=pretrained, arch=arch,
                        img_size=img_size, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))

    spec = registry.ArchSpec(name, build, "narrow SwinV2 (tests)", "SwinV2", "FCN", img_size=64)
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    monkeypatch.setitem(registry.ARCHS, name, spec.description)
    return name


@pytest.mark.slow
def test_swinv2_at_its_fixed_size_exports_to_onnx_and_timm_whole(run_cli, demo_root, tmp_path, narrow_swinv2):
    # 64 px: 16×16 tokens in 8×8 windows, so the shifted windows and their attention mask are in the graph
    family = Family(demo_root, tmp_path, narrow_swinv2, 64)
    family.check_onnx(run_cli)
    family.check_timm(run_cli, whole=True, mean=IMAGENET_MEAN, by_file=False)  # by the folder: img_size from config


@pytest.mark.slow
def test_efficientnet_lite0_exports_to_onnx_and_timm_with_its_own_statistics(run_cli, demo_root, tmp_path):
    family = Family(demo_root, tmp_path, "tf_efficientnet_lite0_mldecoder", 32)
    family.check_onnx(run_cli)
    # its backbone takes mean = std = 0.5 inputs (aicoss re-normalises inside the model)
    family.check_timm(run_cli, whole=False, mean=(0.5, 0.5, 0.5))


# --------------------------------------------------------------------------- predict and ensemble with ONNX


def test_predict_and_ensemble_take_an_onnx_model_as_they_take_its_checkpoint(run_cli, demo_root, random_checkpoint,
                                                                              tmp_path):
    from helpers import read_csv

    onnx = tmp_path / "model.onnx"
    export_ok(run_cli, random_checkpoint, "--out", onnx)
    for split in ("test", "val"):
        a, b = tmp_path / f"ckpt_{split}.csv", tmp_path / f"onnx_{split}.csv"
        assert run_cli("predict", random_checkpoint, "--split", split, "--out", a).code == 0
        result = run_cli("predict", onnx, "--split", split, "--out", b)
        assert result.code == 0, result.stderr
        (ha, ia, pa), (hb, ib, pb) = read_csv(a), read_csv(b)
        assert (ha, ia) == (hb, ib)
        np.testing.assert_allclose(pb, pa, rtol=0, atol=1e-4)
    mixed = run_cli("ensemble", random_checkpoint, onnx, "--out", tmp_path / "ens.csv")
    assert mixed.code == 0, mixed.stderr
    np.testing.assert_allclose(read_csv(tmp_path / "ens.csv")[2], read_csv(tmp_path / "ckpt_test.csv")[2],
                               rtol=0, atol=1e-4)  # a model and its own export: their mean is the model


def test_predict_on_a_corrupt_or_foreign_onnx_file_is_a_one_line_error(run_cli, random_checkpoint, tmp_path):
    onnx = tmp_path / "model.onnx"
    export_ok(run_cli, random_checkpoint, "--out", onnx)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx.read_bytes()[:2000])
    assert_one_line_error(run_cli("predict", broken, "--out", tmp_path / "p.csv"), "broken.onnx")
    foreign = tmp_path / "foreign.onnx"
    import onnx as onnx_lib

    model = onnx_lib.load(str(onnx))
    del model.metadata_props[:]
    onnx_lib.save(model, str(foreign))
    assert_one_line_error(run_cli("predict", foreign, "--out", tmp_path / "p.csv"), "not an aicoss ONNX model")
    assert not (tmp_path / "p.csv").exists()
