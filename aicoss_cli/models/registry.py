"""The arch registry: arch name -> builder, and the one door in (`build_model`).

An arch is registered with a small decorated builder in `zoo.py` (adding one touches that file
only); the CLI and recipes only ever see names. Building on the `meta` device
(`count_parameters`) allocates no memory, so the whole parameter table is cheap.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.models.spec import ArchSpec
from aicoss_cli.models.zoo import ZOO

_REGISTRY = ZOO.specs

#: arch name -> one-line description, for every registered arch.
ARCHS: dict[str, str] = ZOO.descriptions


def get_spec(arch: str) -> ArchSpec:
    """The registry entry for `arch`; UserError naming the closest valid names otherwise."""
    spec = _REGISTRY.get(arch)
    if spec is not None:
        return spec
    spec = _REGISTRY.get(str(arch).strip().lower().replace("-", "_"))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(str(arch), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid archs: {', '.join(_REGISTRY)}"
    raise UserError(f"unknown arch {arch!r}: {hint} (`aicoss count-params` lists them all)")


def default_img_size(arch: str) -> int:
    """The input size an arch was designed (and pretrained) for: 224 for most."""
    return get_spec(arch).img_size


def arch_display(arch: str) -> tuple[str, str]:
    """(Backbone, Decoder) as the seed's tables name them, e.g. ("TResNet_XL", "ML-Decoder")."""
    spec = get_spec(arch)
    return spec.backbone, spec.decoder


def _check_build_args(arch: str, num_classes: int, img_size: int | None) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"{arch}: num_classes must be a positive integer (got {num_classes!r})")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 16):
        raise UserError(f"{arch}: img_size must be an integer >= 16 (got {img_size!r})")


def build_model(
    arch: str,
    num_classes: int,
    pretrained: bool | str = False,
    img_size: int | None = None,
) -> nn.Module:
    """Build a registered arch: float images (B, 3, H, W), ImageNet-normalised -> logits (B, K).

    `pretrained`: False = random init (no network); True = the backbone's ImageNet weights via
    timm's / the Hugging Face hub's normal download (a UserError says what to do offline);
    a path = a local safetensors file or PyTorch state dict (full model in our/seed naming, or
    backbone only). After a path load, `model.pretrained_report` says which tensors came from it.
    """
    spec = get_spec(arch)
    _check_build_args(spec.name, num_classes, img_size)
    size = img_size or spec.img_size
    if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
        from aicoss_cli.models.pretrained import load_pretrained_file

        model = spec.builder(num_classes, pretrained=False, img_size=size, arch=spec.name)
        model.pretrained_report = load_pretrained_file(model, pretrained, arch=spec.name)
        return model
    if not isinstance(pretrained, bool):
        raise UserError(f"{spec.name}: pretrained must be true, false or a file path (got {pretrained!r})")
    return spec.builder(num_classes, pretrained=pretrained, img_size=size, arch=spec.name)


@functools.lru_cache(maxsize=64)
def input_size_problem(arch: str, img_size: int) -> str | None:
    """Why `arch` cannot take img_size×img_size images (None when it can): one forward pass of a
    batch of one on the `meta` device (shapes only, no memory, well under a second)."""
    spec = get_spec(arch)
    try:
        with torch.device("meta"), torch.no_grad():
            spec.builder(1, pretrained=False, img_size=img_size, arch=spec.name).eval()(
                torch.zeros(1, 3, img_size, img_size))
    except NotImplementedError:  # an operation without a meta kernel: the shapes are not known here
        return None
    except Exception as exc:  # the shape errors of convolutions, reshapes and attention windows
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if len(text) <= 160 else text[:157] + "..."
    return None


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(arch: str, num_classes: int = 60) -> int:
    """Trainable parameters (requires_grad) of `arch`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    return _count_trainable(model)


def param_rows(archs: list[str] | None = None, num_classes: int = 60) -> list[dict]:
    """One row per arch for the parameter table: arch, backbone, decoder, params, params_m."""
    rows = []
    for arch in archs if archs else list(_REGISTRY):
        spec = get_spec(arch)
        params = count_parameters(spec.name, num_classes)
        rows.append(
            {
                "arch": spec.name,
                "backbone": spec.backbone,
                "decoder": spec.decoder,
                "params": params,
                "params_m": round(params / 1e6, 2),
            }
        )
    return rows
