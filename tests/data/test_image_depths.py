"""The one decoder and the image check on the files phones, scanners and microscopes write: 16-bit
and float grayscale decode to 8 bits by their value range (the same pixels for training and
inference) or are refused naming the file and its mode, bytes after a JPEG's or PNG's end are
accepted, and EXIF orientation is applied only when the recipe asks, by every decoder alike."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, pil_pixels, read_csv, save_random_checkpoint

RNG = np.random.default_rng(0)


def gray_pixels(array8: np.ndarray, size: int | None = None) -> torch.Tensor:
    """The reference: an 8-bit grayscale array as PIL decodes it (via an 8-bit PNG), (3, S, S)."""
    buffer = io.BytesIO()
    Image.fromarray(array8, "L").save(buffer, format="PNG")
    buffer.seek(0)
    return pil_pixels(buffer, size)


def decoders(path: Path, size: int, exif_transpose: bool = False) -> dict[str, torch.Tensor]:
    """The pixels of every decoder: training's dataset, inference's batches, the plain decode."""
    from aicoss_cli.data.images import decode_batch, decode_image
    from aicoss_cli.data.loading import ImageDataset

    asked = {"exif_transpose": True} if exif_transpose else {}  # the default is not to
    batches, error = decode_batch([str(path)], [size], **asked)
    assert not error, error
    image, _, _, error = ImageDataset([str(path)], None, size, **asked)[0]
    assert not error, error
    return {"decode_image": decode_image(str(path), size, **asked), "decode_batch": batches[0][0],
            "ImageDataset": image}


def sixteen_bit(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Files of the high bit depths, each with the 8-bit array it must decode to (computed here
    with numpy: 16-bit integers >> 8; floats in [0, 1] × 255; other floats by their own range)."""
    full = RNG.integers(0, 65536, (32, 32)).astype(np.uint16)
    twelve = RNG.integers(0, 4096, (32, 32)).astype(np.uint16)  # 12-bit data stored in 16 bits
    unit = RNG.random((32, 32)).astype(np.float32)
    wide = (RNG.random((32, 32)) * 8 - 3).astype(np.float32)
    cases = {}

    def save(name: str, image: Image.Image, want: np.ndarray) -> None:
        image.save(tmp_path / name)
        cases[name] = (tmp_path / name, want)

    save("gray16.png", Image.fromarray(full), (full >> 8).astype(np.uint8))
    save("gray12.png", Image.fromarray(twelve), (twelve >> 8).astype(np.uint8))
    save("gray16be.tif", Image.frombytes("I;16B", (32, 32), full.astype(">u2").tobytes()), (full >> 8).astype(np.uint8))
    save("gray32.tif", Image.fromarray(full.astype(np.int32), "I"), (full >> 8).astype(np.uint8))
    save("unit.tif", Image.fromarray(unit, "F"), np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    scaled = (wide.astype(np.float64) - wide.min()) / (wide.max() - wide.min()) * 255
    save("wide.tif", Image.fromarray(wide, "F"), np.rint(scaled).astype(np.uint8))
    return cases


def test_high_bit_depths_decode_by_their_value_range_in_every_decoder(tmp_path):
    cases = sixteen_bit(tmp_path)
    assert {Image.open(p).mode for p, _ in cases.values()} == {"I;16", "I;16B", "I", "F"}
    for name, (path, want) in cases.items():
        assert 40 < int(want.max()) - int(want.min()) or name == "gray12.png", name  # not blank
        for size in (32, 16):
            expected = gray_pixels(want, size)
            for decoder, got in decoders(path, size).items():
                assert torch.equal(got, expected), (name, size, decoder)


def test_a_sixteen_bit_data_set_predicts_as_its_eight_bit_twin(run_cli, demo_root, tmp_path):
    """The same images as 8-bit and as 16-bit PNGs (value v stored as v × 257): the same predictions."""
    from aicoss_cli.data.tables import read_test

    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    roots = {bits: tmp_path / f"png{bits}" for bits in (8, 16)}
    for bits, root in roots.items():
        (root / "test").mkdir(parents=True)
        for name in ("train.csv", "sample_submission.csv"):
            shutil.copy(demo_root / name, root / name)
        (root / "test.csv").write_text((demo_root / "test.csv").read_text().replace(".jpg", ".png"))
        for path in read_test(demo_root).paths:
            gray = np.asarray(Image.open(path).convert("L"))
            image = Image.fromarray(gray) if bits == 8 else Image.fromarray(gray.astype(np.uint16) * 257)
            image.save(root / "test" / Path(path).with_suffix(".png").name)
    outputs = {}
    for bits, root in roots.items():
        result = run_cli("predict", checkpoint, "--data", root, "--out", tmp_path / f"p{bits}.csv")
        assert result.code == 0, result.stderr
        outputs[bits] = (tmp_path / f"p{bits}.csv").read_bytes()
    assert Image.open(roots[16] / "test" / "TEST_00000.png").mode == "I;16"
    assert outputs[16] == outputs[8]


@pytest.mark.parametrize("image, needles", [
    (Image.fromarray(np.full((32, 32), 70000, dtype=np.int32), "I"), ["mode I", "0..65535"]),
    (Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), "F"), ["mode F", "not finite"]),
])
def test_a_high_bit_image_without_a_known_scale_is_refused_naming_it(run_cli, data_copy, write_recipe, image, needles):
    image.save(data_copy / "train" / "TRAIN_00003.jpg", format="TIFF")  # PIL reads by content, not by name
    result = run_cli("validate", write_recipe(data_copy), "--data", data_copy)
    assert_one_line_error(result, "train/TRAIN_00003.jpg", *needles)


def test_bytes_after_the_end_of_a_jpeg_or_png_are_accepted(run_cli, data_copy, write_recipe):
    """A phone's motion photo appends a video after the JPEG's end-of-image marker."""
    jpeg = data_copy / "train" / "TRAIN_00000.jpg"
    png = data_copy / "train" / "TRAIN_00001.jpg"
    Image.open(png).save(png, format="PNG")
    want = {p: pil_pixels(p, 32) for p in (jpeg, png)}
    video = b"\x00\x00\x00\x18ftypmp42" + RNG.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    for path in (jpeg, png):
        path.write_bytes(path.read_bytes() + video)
    result = run_cli("validate", write_recipe(data_copy), "--data", data_copy)
    assert result.code == 0, result.stderr
    for path in (jpeg, png):
        assert all(torch.equal(got, want[path]) for got in decoders(path, 32).values()), path


def test_a_jpeg_that_really_ends_early_is_still_refused(run_cli, data_copy, write_recipe):
    jpeg = data_copy / "train" / "TRAIN_00002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    assert_one_line_error(run_cli("validate", write_recipe(data_copy), "--data", data_copy), "TRAIN_00002.jpg",
                          "truncated")


def rotated_jpeg(path: Path, orientation: int = 6) -> None:
    """A 48×32 JPEG whose EXIF says `orientation`."""
    array = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    array[:8, :8] = 255  # a corner that tells the orientations apart
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)


def reference(path: Path, size: int, upright: bool) -> torch.Tensor:
    """PIL's pixels (drafted as the decoder drafts), turned upright with numpy for orientation 6
    (the camera turned 90° clockwise: shown upright, the stored image turns 90° clockwise)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        array = np.asarray(img.convert("RGB"))
    if upright:
        array = np.ascontiguousarray(np.rot90(array, k=-1))
    return torch.from_numpy(np.array(Image.fromarray(array).resize((size, size), Image.BILINEAR))).permute(2, 0, 1)


def test_exif_orientation_is_applied_only_when_asked_and_alike_by_every_decoder(tmp_path):
    path = tmp_path / "phone.jpg"
    rotated_jpeg(path)
    for size in (32, 16):
        for upright in (False, True):
            want = reference(path, size, upright)
            for decoder, got in decoders(path, size, exif_transpose=upright).items():
                assert torch.equal(got, want), (decoder, size, upright)


@pytest.mark.slow  # trains, exports and predicts three times: ~15 s on 2 shared cores
def test_a_recipe_with_exif_transpose_tells_predict_and_the_onnx_export(run_cli, demo_root, write_recipe, tmp_path):
    root = tmp_path / "phones"
    shutil.copytree(demo_root, root)
    for path in sorted(root.glob("t*/*.jpg")):
        image = Image.open(path)
        exif = image.getexif()
        exif[0x0112] = 8
        image.save(path, quality=95, exif=exif)
    recipe = write_recipe(root, extra="")
    recipe.write_text(recipe.read_text().replace("split_seed = 78", "split_seed = 78\nexif_transpose = true"))
    assert run_cli("train", recipe, "--out", tmp_path / "runs").code == 0
    run = next((tmp_path / "runs").glob("*/*"))
    val = run_cli("predict", run / "best.safetensors", "--split", "val", "--out", tmp_path / "val.csv")
    assert val.code == 0, val.stderr
    assert (tmp_path / "val.csv").read_bytes() == (run / "val_scores.csv").read_bytes()
    assert run_cli("export", run / "best.safetensors", "--out", tmp_path / "m.onnx").code == 0
    assert run_cli("predict", tmp_path / "m.onnx", "--out", tmp_path / "onnx.csv").code == 0
    _, _, onnx_probs = read_csv(tmp_path / "onnx.csv")
    _, _, torch_probs = read_csv(run / "submission.csv")
    assert np.abs(onnx_probs - torch_probs).max() < 1e-5
