"""The one decoder (`data.images`): PIL's pixels at every size, for training and inference, with
torchvision's public JPEG decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aicoss_cli.data.tables import read_test

from helpers import pil_pixels


def _image_files(tmp_path: Path) -> list[Path]:
    """A large RGB JPEG (PIL decodes it at a reduced DCT scale), a grayscale JPEG, a PNG and a CMYK JPEG."""
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["SMOOTH"]).SMOOTH)
    paths = [tmp_path / "big.jpg", tmp_path / "gray.jpg", tmp_path / "small.png", tmp_path / "cmyk.jpg"]
    big.save(paths[0], quality=85)
    big.convert("L").resize((40, 30)).save(paths[1], quality=90)
    big.resize((24, 24)).save(paths[2])
    big.resize((40, 40)).convert("CMYK").save(paths[3], quality=90)
    return paths


def test_the_one_decoder_gives_pils_pixels_at_every_size_in_training_and_inference(demo_root, tmp_path):
    from aicoss_cli.data import images
    from aicoss_cli.data.loading import ImageDataset

    paths = [Path(p) for p in read_test(demo_root).paths[:6]] + _image_files(tmp_path)
    sizes = [16, 32, 48, 100]
    for path in paths:
        batches, error = images.decode_batch([str(path)], sizes)  # inference: one decode, every size
        assert error == ""
        for size, batch in zip(sizes, batches):
            want = pil_pixels(str(path), size)
            assert torch.equal(batch[0], want), (path.name, size)
            assert torch.equal(ImageDataset([str(path)], None, size)[0][0], want), (path.name, size)  # training
    # the fast decoder was used and agreed with PIL (without it, decoding costs about twice as much)
    assert images.torchvision_jpeg() is not False and images._fast_jpeg_ok is True


def test_jpegs_are_decoded_by_the_public_torchvision_decoder_quietly(demo_root, monkeypatch):
    import warnings

    import torch
    import torchvision.io

    from aicoss_cli.data import images as inference
    from aicoss_cli.data.tables import read_test

    from helpers import pil_pixels

    calls = []
    public = torchvision.io.decode_jpeg

    def spy(*args, **kwargs):
        calls.append(1)
        return public(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    monkeypatch.setattr(inference, "_jpeg_decoder", None)
    monkeypatch.setattr(inference, "_fast_jpeg_ok", None)
    path = read_test(demo_root).paths[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        decoded = inference.decode_image(path, 32)
    assert calls and inference._fast_jpeg_ok is True
    assert torch.equal(decoded, pil_pixels(path, 32))
    assert not [w for w in seen if issubclass(w.category, DeprecationWarning)]
