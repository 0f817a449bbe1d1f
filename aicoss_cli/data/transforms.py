"""Training augmentation on decoded uint8 (3, H, W) tensors: the seed's weak (Cutout + RandAugment)
and strong (flips + Cutout + AutoAugment) policies, and the seed of each image's augmentation."""

from __future__ import annotations

import torch

from aicoss_cli.base.errors import UserError


class Cutout(torch.nn.Module):
    """Cut a square of side `factor`·H × `factor`·W at a random centre (clipped at the borders)
    and fill it with one random colour, as the seed's CutoutPIL does."""

    def __init__(self, factor: float = 0.5):
        super().__init__()
        self.factor = factor

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.factor <= 0:
            return img
        _, h, w = img.shape
        ch, cw = int(h * self.factor + 0.5), int(w * self.factor + 0.5)
        y = int(torch.randint(0, h, ()))
        x = int(torch.randint(0, w, ()))
        y0, y1 = max(0, y - ch // 2), min(h, y + ch // 2)
        x0, x1 = max(0, x - cw // 2), min(w, x + cw // 2)
        colour = torch.randint(0, 256, (3, 1, 1), dtype=torch.uint8)
        out = img.clone()
        out[:, y0:y1, x0:x1] = colour
        return out


def build_train_transform(policy: str, magnitude: int = 9, num_ops: int = 2, cutout_factor: float = 0.5):
    """Augmentation on a resized uint8 (3, H, W) tensor; None for policy "none"."""
    from torchvision.transforms import v2

    if policy == "none":
        return None
    if policy == "weak":
        return v2.Compose([Cutout(cutout_factor), v2.RandAugment(num_ops=num_ops, magnitude=magnitude)])
    if policy == "strong":
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                Cutout(cutout_factor),
                v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
            ]
        )
    raise UserError(f"[augment] policy must be weak, strong or none (got {policy!r})")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: independent of workers, ranks and resumes."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)
