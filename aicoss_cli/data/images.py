"""Images: THE decoder of aicoss, and the checks run on every image before any compute.

Training (`ImageDataset`), validation, the submission, predict, ensemble, the ONNX path and the
export check all decode through `decode_image` / `decode_batch`, so a model sees the same pixels
wherever it runs. The pixels are PIL's: convert to RGB (EXIF orientation is not applied, as timm's
loader does not), for a JPEG at the DCT scale PIL's `draft` picks for the target size, then a
bilinear, antialiased resize to S×S. JPEGs are decoded by torchvision's libjpeg-turbo where that
gives PIL's pixels (checked once per process on a real image; faster), by PIL otherwise.
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from aicoss_cli.base.errors import UserError

# --------------------------------------------------------------------------- checks


def refuse_decompression_bombs() -> None:
    """Make PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, 89 Mpx: a 9459×9459 image) an error:
    above it PIL only warns, and a 17 KB PNG can then decode to gigabytes. Call before opening
    images (cheap; per process, as loader processes may not inherit the filter)."""
    if _BOMB_FILTER not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def too_many_pixels(exc: BaseException) -> str | None:
    """What to say when `exc` is PIL refusing an image above its pixel limit (else None)."""
    if not isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return None
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{found.group(1)} pixels" if found else "too many pixels"
    return (f"too large ({pixels}; the limit is {Image.MAX_IMAGE_PIXELS}, PIL's MAX_IMAGE_PIXELS): "
            "downscale it")


HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL's converters clip these to 8 bits


def eight_bits(img: Image.Image) -> Image.Image:
    """A grayscale image of a high bit depth as 8-bit grayscale ("L"), by its value range: integers
    in 0..65535 (16-bit, or 12-bit data stored in 16) `>> 8`; floats in [0, 1] `round(x · 255)`,
    other finite floats `round((x − min) / (max − min) · 255)`. ValueError (naming the mode) where no
    scale is known: integers outside 0..65535, non-finite floats."""
    array = np.asarray(img)
    if img.mode == "F":
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("PIL mode F with pixels that are not finite (NaN or infinite); save it as 8 or 16 bits")
        low, high = float(values.min()), float(values.max())
        if not (low >= 0.0 and high <= 1.0):
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), "L")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(f"PIL mode {img.mode} with pixels from {low} to {high}, outside 0..65535, so no 8-bit scale "
                         "is known; save it as 8 or 16 bits")
    return Image.fromarray((array.astype(np.uint32) >> 8).astype(np.uint8), "L")


def to_rgb(img: Image.Image, exif_transpose: bool = False) -> Image.Image:
    """The RGB pixels of an opened image: turned upright by its EXIF orientation when asked, high
    bit depths mapped to 8 bits (`eight_bits`), then PIL's conversion."""
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_BIT_MODES:
        img = eight_bits(img)
    return img.convert("RGB")


def _decodes(path: str, fmt: str) -> str | None:
    """None when PIL decodes the whole image (bytes after its end, as a motion photo's video, are
    fine), else why not."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:
        if too_many_pixels(exc):
            return too_many_pixels(exc)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"truncated {fmt} ({reason})"
    return None


def _image_problem(path: str) -> str | None:
    """Why an image cannot be used, or None. Cheap: a header parse and the end-of-file marker; a full
    decode only where the marker is not at the end, and for 32-bit and float pixels (to know their
    range)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "missing"
    if size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            if mode in ("I", "F"):
                eight_bits(img)
        with open(path, "rb") as f:
            f.seek(max(0, size - 64))
            tail = f.read()
    except ValueError as exc:  # eight_bits: no known scale
        return str(exc)
    except Exception as exc:  # PIL raises several types for unreadable files
        if too_many_pixels(exc):
            return too_many_pixels(exc)
        reason = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).replace(f" {path!r}", "")
        truncated = reason.lower().startswith("truncated") or "is truncated" in reason.lower()
        return f"truncated file ({reason})" if truncated else f"unreadable ({reason})"
    if (fmt == "JPEG" and b"\xff\xd9" not in tail) or (fmt == "PNG" and b"IEND" not in tail):
        return _decodes(path, fmt)
    return None


def check_images(paths: Sequence[str], csv: Path, on_progress: Callable[[int], None] | None = None) -> None:
    """Every image must exist and look complete; report how many fail and the first few."""
    problems: list[tuple[str, str]] = []
    refuse_decompression_bombs()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for path, problem in zip(paths, pool.map(_image_problem, paths, chunksize=256)):
            if problem:
                problems.append((path, problem))
            if on_progress:
                on_progress(1)
    if not problems:
        return
    missing = [p for p, why in problems if why == "missing"]
    if missing:
        names = ", ".join(_short(p, csv) for p in missing[:3])
        raise UserError(
            f"{csv}: {len(missing)} of {len(paths)} images are missing (first: {names}); check img_path and the data root"
        )
    path, why = problems[0]
    raise UserError(
        f"{csv}: {len(problems)} of {len(paths)} images cannot be used (first: {_short(path, csv)}: {why}); "
        "replace or remove those rows"
    )


def _short(path: str, csv: Path) -> str:
    try:
        return str(Path(path).relative_to(os.path.abspath(csv.parent)))
    except ValueError:
        return path


# --------------------------------------------------------------------------- decoding


_fast_jpeg_ok: bool | None = None  # does torchvision decode JPEGs to PIL's pixels? (checked once per process)
_jpeg_decoder = None  # torchvision's public libjpeg-turbo decoder, resolved once (False: not available)


def torchvision_jpeg():
    """torchvision's public `decode_jpeg` (False without it, e.g. a torchvision without image
    I/O: then PIL decodes). torchvision 0.29 deprecated its image I/O in favour of TorchCodec and
    warns on every call; that warning is silenced, as the decoder's pixels are checked against
    PIL's anyway (`_fast_jpeg`) and PIL takes over the day it is gone."""
    global _jpeg_decoder
    if _jpeg_decoder is None:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception:  # no torchvision image I/O
            _jpeg_decoder = False
        else:
            _jpeg_decoder = functools.partial(_decode_quietly, decode_jpeg, ImageReadMode.UNCHANGED)
    return _jpeg_decoder


_QUIET_TORCHVISION = ("ignore", None, DeprecationWarning, re.compile(r"torchvision\.io"), 0)


def _decode_quietly(decode_jpeg, mode, data: torch.Tensor) -> torch.Tensor:
    if _QUIET_TORCHVISION not in warnings.filters:  # a cheap check: a caller may have reset the filters
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
    return decode_jpeg(data, mode=mode)


def _jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale PIL's `draft` picks for a size×size target (as `_pil_sizes` asks for)."""
    scale = min(width // size, height // size)
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def _hwc(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 copy of an RGB PIL image."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def _pil_sizes(raw: bytes, sizes: Sequence[int], exif_transpose: bool = False) -> dict[int, torch.Tensor]:
    """PIL's pixels (the module docstring's recipe), one decode per distinct draft scale; (H, W, 3)
    tensors."""
    out: dict[int, torch.Tensor] = {}
    by_scale: dict[int, list[int]] = {}
    with Image.open(io.BytesIO(raw)) as probe:
        fmt, (w, h) = probe.format, probe.size
    for size in sizes:
        scale = _jpeg_scale(w, h, size) if fmt == "JPEG" else 1
        by_scale.setdefault(scale, []).append(size)
    for group in by_scale.values():
        with Image.open(io.BytesIO(raw)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (group[0], group[0]))
            rgb = to_rgb(img, exif_transpose)
        for size in group:
            out[size] = _hwc(rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.BILINEAR))
    return out


def _fast_jpeg(raw: bytes) -> torch.Tensor | None:
    """(H, W, 3) uint8 RGB via torchvision, or None where PIL must decode (not a complete 1- or
    3-channel JPEG, or torchvision's libjpeg differs from PIL's here)."""
    global _fast_jpeg_ok
    if _fast_jpeg_ok is False or raw[:2] != b"\xff\xd8" or b"\xff\xd9" not in raw[-64:]:
        return None  # a truncated JPEG goes to PIL, which reports it as the training loader does
    decode = torchvision_jpeg()
    if decode is False:
        return None
    try:
        pixels = decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8)).permute(1, 2, 0)
    except Exception:  # unsupported variant (arithmetic coding, lossless...) or another signature: PIL decides
        return None
    if pixels.shape[2] == 1:
        pixels = pixels.expand(-1, -1, 3)  # PIL's L -> RGB conversion replicates the channel too
    elif pixels.shape[2] != 3:
        return None
    if _fast_jpeg_ok is None:
        with Image.open(io.BytesIO(raw)) as img:
            _fast_jpeg_ok = bool(torch.equal(_hwc(img.convert("RGB")), pixels))
        if not _fast_jpeg_ok:
            return None
    return pixels


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(chunks)


def _turned(raw: bytes) -> bool:
    """Whether a JPEG's EXIF orientation turns or flips it (any value but 1)."""
    with Image.open(io.BytesIO(raw)) as img:
        return img.getexif().get(0x0112, 1) not in (1, None)


def _decode_hwc(path: str, sizes: Sequence[int], exif_transpose: bool = False) -> dict[int, torch.Tensor]:
    raw = _read(path)
    turned = exif_transpose and raw[:2] == b"\xff\xd8" and _turned(raw)
    pixels = None if turned else _fast_jpeg(raw)  # PIL turns an image upright
    if pixels is None:
        return _pil_sizes(raw, sizes, exif_transpose)
    h, w, _ = pixels.shape
    smallest = min(sizes)
    if h >= 2 * smallest and w >= 2 * smallest:  # `_jpeg_scale` > 1: PIL decodes at a reduced DCT scale
        return _pil_sizes(raw, sizes)
    out: dict[int, torch.Tensor] = {}
    rgb = None
    for size in sizes:
        if (h, w) == (size, size):
            out[size] = pixels
            continue
        if rgb is None:
            rgb = Image.fromarray(pixels.contiguous().numpy(), "RGB")
        out[size] = _hwc(rgb.resize((size, size), Image.BILINEAR))
    return out


def decode_image(path: str, size: int, exif_transpose: bool = False) -> torch.Tensor:
    """The image at `path` as a (3, S, S) uint8 tensor: what training trains on and what inference
    sees (`decode_batch` gives the same pixels); `exif_transpose`: upright by its EXIF orientation."""
    refuse_decompression_bombs()
    return _decode_hwc(path, [size], exif_transpose)[size].permute(2, 0, 1).contiguous()


def decode_batch(paths: Sequence[str], sizes: Sequence[int], pin: bool = False,
                 exif_transpose: bool = False) -> tuple[list[torch.Tensor], str]:
    """One uint8 (B, 3, S, S) tensor per size (channels-last in memory: images stack as decoded),
    and the first decode error ("" if none).

    Errors are returned, not raised, so loader processes hand back a one-line message."""
    images: list[list[torch.Tensor]] = [[] for _ in sizes]
    refuse_decompression_bombs()
    for path in paths:
        try:
            decoded = _decode_hwc(path, sizes, exif_transpose)
        except Exception as exc:  # missing, truncated or not an image: reported with the file's name
            if too_many_pixels(exc):
                return [], f"{path}: {too_many_pixels(exc)}"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return [], f"{path}: cannot decode image ({type(exc).__name__}: {reason})"
        for per_size, size in zip(images, sizes):
            per_size.append(decoded[size])
    batches = []
    for per_size, size in zip(images, sizes):
        hwc = torch.stack(per_size) if per_size else torch.empty(0, size, size, 3, dtype=torch.uint8)
        batches.append((hwc.pin_memory() if pin else hwc).permute(0, 3, 1, 2))
    return batches, ""
