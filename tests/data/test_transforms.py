"""The training transforms: Cutout, the augmentation policies and their seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aicoss_cli.data.loading import ImageDataset
from aicoss_cli.data.tables import read_train
from aicoss_cli.data.transforms import Cutout, build_train_transform, sample_seed


def test_cutout_fills_one_square_with_one_colour():
    torch.manual_seed(0)
    img = torch.full((3, 20, 20), 7, dtype=torch.uint8)
    out = Cutout(0.5)(img)
    changed = (out != img).any(dim=0)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert changed.sum() > 0 and (ys.max() - ys.min() + 1) <= 10 and (xs.max() - xs.min() + 1) <= 10
    colours = out[:, changed].T.unique(dim=0)
    assert len(colours) == 1


@pytest.mark.parametrize("policy", ["weak", "strong", "none"])
def test_transforms_keep_shape_and_range_and_are_deterministic_per_seed(demo_root, policy):
    table = read_train(demo_root)
    ds = ImageDataset(table.paths, table.labels, 40, build_train_transform(policy, 9, 2, 0.5))
    a, target, index, error = ds[(3, sample_seed(1, 0, 3))]
    b, *_ = ds[(3, sample_seed(1, 0, 3))]
    c, *_ = ds[(3, sample_seed(1, 1, 3))]
    assert a.shape == (3, 40, 40) and a.dtype == torch.uint8 and error == "" and index == 3
    assert torch.equal(a, b)
    assert torch.equal(target, torch.from_numpy(table.labels[3].astype(np.float32)))
    plain, *_ = ds[3]
    if policy == "none":
        assert torch.equal(a, plain) and torch.equal(a, c)
    else:
        assert not torch.equal(a, c)  # another epoch, another augmentation


def test_augmentation_leaves_the_global_rng_alone(demo_root):
    table = read_train(demo_root)
    ds = ImageDataset(table.paths, table.labels, 32, build_train_transform("weak"))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)
