"""Backbone factories: timm CNNs/transformers, Hugging Face CvT, and a tiny test convnet.

timm and transformers are imported inside the factories, so importing the registry is cheap.
With `pretrained=True` they download through timm / the Hugging Face hub as usual; when that is
impossible the error names the weights and how to point the recipe at a local file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError

LOCAL_WEIGHTS_HINT = (
    'set [model] pretrained = "path/to/weights.safetensors" (or a .pth state dict), or pretrained = false'
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def download_failed(arch: str, weights: str, url: str, exc: BaseException) -> UserError:
    """The one-line error for a pretrained download that could not happen."""
    reason = " ".join(str(exc).split())
    reason = (reason[:120] + "...") if len(reason) > 120 else reason
    return UserError(
        f"{arch}: cannot download the pretrained backbone weights {weights} ({type(exc).__name__}: {reason}). "
        f"Offline, fetch them from {url} elsewhere and " + LOCAL_WEIGHTS_HINT
    )


def timm_weights(model_name: str) -> tuple[str, str]:
    """(name, address) of the weights timm would download for `model_name`."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is not None and cfg.hf_hub_id:
        return f"timm `{cfg.hf_hub_id}`", f"https://huggingface.co/{cfg.hf_hub_id}"
    return f"timm `{model_name}`", (cfg.url if cfg is not None and cfg.url else "the timm model zoo")


def timm_backbone(
    model_name: str,
    *,
    arch: str,
    pretrained: bool,
    num_classes: int = 0,
    global_pool: str = "",
    **kwargs,
) -> nn.Module:
    """A timm model; `num_classes=0, global_pool=""` (default) returns the unpooled feature map."""
    import timm

    if not pretrained:
        return timm.create_model(model_name, num_classes=num_classes, global_pool=global_pool, **kwargs)
    if timm.models.get_pretrained_cfg(model_name) is None:
        raise UserError(f"{arch}: timm has no pretrained weights for {model_name}; " + LOCAL_WEIGHTS_HINT)
    try:
        return timm.create_model(
            model_name, pretrained=True, num_classes=num_classes, global_pool=global_pool, **kwargs
        )
    except Exception as exc:  # any failed download (offline, proxy, empty cache) -> advice
        raise download_failed(arch, *timm_weights(model_name), exc) from exc


class CvtFeatures(nn.Module):
    """Hugging Face CvT (`transformers.CvtModel` as `cvt`) -> last stage's map (B, C, H, W).

    The seed took `hidden_states[2]` of `CvtForImageClassification` with its final `layernorm`
    and `classifier` replaced by Identity; that is the last stage's output, which `CvtModel`
    returns as `last_hidden_state`. Same keys (`cvt.*`), same values, less work.
    """

    def __init__(self, cvt: nn.Module):
        super().__init__()
        self.cvt = cvt

    def forward(self, images: Tensor) -> Tensor:
        return self.cvt(pixel_values=images, return_dict=True).last_hidden_state


def cvt_backbone(hub_id: str, *, arch: str, pretrained: bool, **config) -> CvtFeatures:
    """CvT from its configuration (no download), or `hub_id`'s weights when pretrained."""
    from transformers import CvtConfig, CvtModel
    from transformers.utils import logging as hf_logging

    if not pretrained:
        return CvtFeatures(CvtModel(CvtConfig(**config)))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused ImageNet classifier is expected, not news
    try:
        cvt = CvtModel.from_pretrained(hub_id)
    except Exception as exc:  # any failed download -> advice
        raise download_failed(arch, f"`{hub_id}`", f"https://huggingface.co/{hub_id}", exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return CvtFeatures(cvt.float())


class InputRenorm(nn.Module):
    """Re-normalise ImageNet-normalised images to the statistics a backbone was trained with.

    A fixed per-channel affine map; its buffers are not persistent, so the state dict is the
    backbone's own.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        src_mean, src_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        dst_mean, dst_std = torch.tensor(mean), torch.tensor(std)
        # x_dst = (x * src_std + src_mean - dst_mean) / dst_std
        self.register_buffer("scale", (src_std / dst_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((src_mean - dst_mean) / dst_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


class TinyConvNet(nn.Module):
    """Three strided 3x3 convs with GroupNorm and GELU, then global average pooling.

    A test/debug backbone: no batch norm (so data-parallel runs match single-process ones
    exactly), ~24k parameters, any input size.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), groups: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.GELU()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images).mean(dim=(2, 3))
