"""The timm side of `aicoss export --format safetensors-timm`: which timm model an aicoss arch's
backbone is, its weights in timm's naming, the config.json that says how to feed it, and loading
the folder back with `timm.create_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import unshare, write_bytes_atomic
from aicoss_cli.data.loading import IMAGENET_MEAN, IMAGENET_STD
from aicoss_cli.models.checkpoint import CheckpointMeta

TIMM_WEIGHTS, TIMM_CONFIG = "model.safetensors", "config.json"
TIMM_FILES = (TIMM_WEIGHTS, TIMM_CONFIG)  # all a safetensors-timm export writes


@dataclass
class TimmParts:
    """How an aicoss model's backbone maps to a timm model."""

    name: str  # timm model name, e.g. "resnet50"
    state: dict[str, Tensor]  # in timm's naming
    model_args: dict  # what timm.create_model needs besides the name (num_classes, global_pool, img_size)
    with_classifier: bool  # True: the whole network (FCN rows); False: the backbone (our head is not timm's)
    backbone: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]


def timm_parts(model: nn.Module, arch: str) -> TimmParts:
    """The timm model inside an aicoss model, its state dict in timm's naming, and the input
    statistics its weights were trained on. UserError for a backbone that is not a timm model."""
    from aicoss_cli.models.fcn import BackboneClassifier, LinearClassifier

    backbone = getattr(model, "backbone", None)
    if backbone is None or not type(backbone).__module__.startswith("timm.") or not hasattr(backbone, "pretrained_cfg"):
        what = type(backbone).__name__ if backbone is not None else type(model).__name__
        origin = "Hugging Face transformers" if "transformers" in type(getattr(backbone, "cvt", backbone)).__module__ else "aicoss's own"
        raise UserError(f"{arch}: its backbone ({what}, {origin}) is not a timm model, so there are no timm weights "
                        "to write; use --format onnx (or torchscript)")
    cfg = backbone.pretrained_cfg
    name = cfg.get("architecture") or type(backbone).__name__.lower()
    args = dict(getattr(backbone, "_model_args", {}))
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    if isinstance(model, LinearClassifier):
        # Our `cls` is the timm model's own classifier slot: the whole network, in timm's naming.
        classifier = cfg.get("classifier")
        if not isinstance(classifier, str):
            raise UserError(f"{arch}: timm's {name} names no single classifier layer; use --format onnx")
        state[f"{classifier}.weight"] = model.cls.weight.detach()
        state[f"{classifier}.bias"] = model.cls.bias.detach()
        args["num_classes"] = model.cls.out_features
        with_classifier = True
    else:
        with_classifier = isinstance(model, BackboneClassifier)
    mean, std = _backbone_statistics(model)
    return TimmParts(name, state, args, with_classifier, backbone, mean, std)


def _backbone_statistics(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the input the backbone sees: ImageNet's, or what an InputRenorm maps them to
    (x_dst = x·scale + shift, scale = std_src/std_dst, shift = (mean_src − mean_dst)/std_dst)."""
    renorm = getattr(model, "renorm", None)
    if renorm is None:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    scale, shift = renorm.scale.flatten().double(), renorm.shift.flatten().double()
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) / scale
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) - shift * std
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def timm_config(parts: TimmParts, meta: CheckpointMeta, metadata: dict[str, str]) -> dict:
    """config.json in the layout timm's `save_for_hf` writes (so `timm.create_model("local-dir:DIR",
    pretrained=True)` reads it), plus an `aicoss` section."""
    size = meta.img_size
    cfg = parts.backbone.pretrained_cfg
    num_classes = int(parts.model_args.get("num_classes", 0))
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
        "interpolation": "bilinear",
        "crop_pct": 1.0,  # training resized the whole image to S×S: no crop
        "crop_mode": "center",
        "mean": list(parts.mean),
        "std": list(parts.std),
        "num_classes": num_classes,
        "first_conv": cfg.get("first_conv"),
        "classifier": cfg.get("classifier"),
    }
    config = {
        "architecture": parts.name,
        "num_classes": num_classes,
        "num_features": int(getattr(parts.backbone, "num_features", 0)),
        "model_args": parts.model_args,
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
    }
    if parts.model_args.get("global_pool"):
        config["global_pool"] = parts.model_args["global_pool"]
    if parts.with_classifier:
        config["label_names"] = list(meta.classes)
    config["aicoss"] = {
        "arch": meta.arch,
        "timm_model": parts.name,
        "contents": "the whole network, classifier included" if parts.with_classifier
        else f"the backbone only (the {meta.arch} head is aicoss's own; export --format onnx for the whole model)",
        "num_classes": meta.num_classes,
        "classes": list(meta.classes),
        "img_size": size,
        "input_mean": list(parts.mean),
        "input_std": list(parts.std),
        "aicoss_input_mean": list(IMAGENET_MEAN),
        "aicoss_input_std": list(IMAGENET_STD),
        "source_checkpoint": metadata["source_checkpoint"],
        "epoch": meta.epoch,
        "val_map": meta.val_map,
        "precision": metadata["precision"],
        "exported_by": metadata["exported_by"],
    }
    return config


def load_timm(folder: str | Path, pretrained_file: bool = True) -> nn.Module:
    """The timm model of a safetensors-timm export, built and loaded by timm itself, the way a user
    would: `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), ...)`."""
    import timm

    folder = Path(folder)
    config = json.loads((folder / TIMM_CONFIG).read_text(encoding="utf-8"))
    args = dict(config.get("model_args", {}))
    overlay = dict(file=str(folder / TIMM_WEIGHTS), num_classes=int(config["num_classes"]))
    return timm.create_model(config["architecture"], pretrained=pretrained_file, pretrained_cfg_overlay=overlay,
                             **args).eval()


def write_timm(parts: TimmParts, config: dict, folder: Path, dtype: torch.dtype) -> None:
    """model.safetensors and config.json into `folder`, each atomically (the umask's modes);
    WriteFailed when the disk refuses them."""
    from safetensors.torch import save

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in parts.state.items()}
    write_bytes_atomic(folder / TIMM_WEIGHTS, save(unshare(tensors), metadata={"format": "pt"}))
    write_bytes_atomic(folder / TIMM_CONFIG, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
