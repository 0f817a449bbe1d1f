"""The one forward loop: the model's outputs on PIL's pixels, the TTA views, the members' weighted mean."""

from __future__ import annotations

from pathlib import Path

import torch

from aicoss_cli.data.tables import read_test

from helpers import pil_pixels


def _member(checkpoint: Path, tta: str = "none"):
    from aicoss_cli.infer.forward import Member
    from aicoss_cli.models.checkpoint import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint)
    return Member(path=str(checkpoint), model=model, img_size=meta.img_size, classes=meta.classes, tta=tta, meta=meta)


def _cpu():
    from aicoss_cli.base.runtime import make_runtime

    return make_runtime("cpu", "fp32", 0)


def test_forward_gives_the_model_outputs_on_pil_pixels(demo_root, random_checkpoint):
    """The one forward loop (validation, submission, predict, ensemble) equals the model applied, by
    hand, to PIL's pixels normalised with ImageNet statistics in float64."""
    from aicoss_cli.infer.forward import forward

    member = _member(random_checkpoint)
    paths = read_test(demo_root).paths
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    pixels = torch.stack([pil_pixels(p, 32) for p in paths]).double()
    x = ((pixels / 255.0 - mean) / std).float()
    with torch.inference_mode():
        expected = member.model(x)
    logits = forward([member], paths, _cpu(), 16, logits=True)
    probs = forward([member], paths, _cpu(), 16)
    assert probs.shape == (1, len(paths), 10)
    torch.testing.assert_close(logits[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(probs[0], torch.sigmoid(expected), rtol=0, atol=1e-6)


def test_tta_flips_average_the_sigmoid_of_each_flipped_view(demo_root, random_checkpoint):
    from aicoss_cli.data.loading import ImageBatches, normalize
    from aicoss_cli.infer.forward import forward

    paths = read_test(demo_root).paths[:20]
    plain, flips = _member(random_checkpoint), _member(random_checkpoint, tta="flips")
    images = next(iter(ImageBatches(paths, [32], 20)))[0]
    x = normalize(images)
    with torch.inference_mode():
        views = [torch.sigmoid(plain.model(torch.flip(x, d) if d else x)) for d in ((), (3,), (2,), (2, 3))]
    got = forward([plain, flips], paths, _cpu(), 8)
    torch.testing.assert_close(got[0], views[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], torch.stack(views).mean(0), rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the flipped views differ: TTA changes something


def test_combine_is_the_weighted_mean_of_members():
    from aicoss_cli.infer.forward import combine

    probs = torch.rand(3, 5, 4)
    torch.testing.assert_close(combine(probs), probs.mean(0))
    torch.testing.assert_close(combine(probs, [2, 0, 2]), (probs[0] + probs[2]) / 2)
