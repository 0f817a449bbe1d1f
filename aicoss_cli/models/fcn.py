"""The "FCN" heads of the seed's tables: one linear layer on globally pooled features."""

from __future__ import annotations

from torch import Tensor, nn


class LinearClassifier(nn.Module):
    """`backbone` (returns pooled features (B, C)) + `cls = Linear(C, K)`.

    The seed's resnet50 / resnet101 / swinv2 models: the backbone's own classifier is removed
    and a new linear layer named `cls` sits beside it.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.cls = nn.Linear(num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.cls(self.backbone(images))


class BackboneClassifier(nn.Module):
    """A backbone whose own classifier was resized to K classes (the seed's `tresnet_xl`:
    `backbone.head.fc = Linear(2656, K)`)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)
