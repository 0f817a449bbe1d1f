"""Forward passes over a data set: the shared core of validation, predict, ensemble and benchmark.

The loop keeps the model busy: each image is read and decoded once per batch (resized per member
size) into uint8 tensors, by loader processes or a background thread while a GPU computes, inline
on the CPU (where anything else competes with the model for the cores); the tensors are pinned on
CUDA, copied non-blocking and normalised on the device; outputs stay tensors until the end (no
per-batch `.tolist()`).

Pixels are exactly those of `data.load_image` (what training and validation saw): JPEGs are
decoded by torchvision's libjpeg-turbo when that gives the same pixels as PIL (checked once per
process) and by PIL otherwise; resizing is always PIL's.
"""

from __future__ import annotations

import contextlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from aicoss_cli.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from aicoss_cli.errors import UserError

TTA_MODES = ("none", "hflip", "flips")
# flip dims of each view on a (B, 3, H, W) batch: identity, horizontal, vertical, both
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "hflip": ((), (3,)),
    "flips": ((), (3,), (2,), (2, 3)),
}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision context for `dtype` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Logits (n, K) float32 on the CPU, in the loader's order."""
    was_training = model.training
    model.eval()
    outputs = []
    non_blocking = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, _, _, errors in loader:
            _raise_decode_errors(errors)
            x = normalize(images.to(device, non_blocking=non_blocking))
            x = x.contiguous(memory_format=memory_format)
            with autocast(device, amp_dtype):
                outputs.append(model(x).float())
            if on_batch:
                on_batch(len(images))
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs).cpu()


def _raise_decode_errors(errors: Sequence[str]) -> None:
    bad = [e for e in errors if e]
    if bad:
        raise UserError(f"{bad[0]}; fix or remove this image (and any other unreadable ones)")


def write_scores_csv(path, ids: Sequence[str], classes: Sequence[str], probs: torch.Tensor | np.ndarray) -> None:
    """img_id + one probability column per class, written atomically."""
    import pandas as pd

    from aicoss_cli.checkpoint import atomic_path

    values = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    frame = pd.DataFrame(values, columns=list(classes))
    frame.insert(0, "img_id", list(ids))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.7g")


# --------------------------------------------------------------------------- device and precision


def inference_device(spec: str, where: str = "--device") -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; `where` names the option in errors."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"{where} {spec}: no CUDA device is available; use auto or cpu")
        return torch.device(spec)
    raise UserError(f"{where} must be auto, cpu, cuda or cuda:N (got {spec!r})")


def half_dtype(device: torch.device) -> torch.dtype:
    """The half precision a device runs fast: fp16 on CUDA, bf16 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def precision_dtype(precision: str, device: torch.device, notes: list[str]) -> torch.dtype | None:
    """Autocast dtype of fp32 | fp16 | bf16 on `device` (None: fp32); a fallback is added to `notes`."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            notes.append("fp16 needs CUDA: running in bf16 on the CPU instead")
            return torch.bfloat16
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notes.append(f"{torch.cuda.get_device_name(device)} has no bf16: running in fp16 instead")
            return torch.float16
        return torch.bfloat16
    raise UserError(f"--precision must be fp32, fp16 or bf16 (got {precision!r})")


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def default_workers(device: torch.device) -> int:
    """Loader processes by default: none on the CPU, where decoding inline costs least (loader
    processes, or a thread, compete with the model for the cores; measured in
    bench/inference_overhead.py); on CUDA the CPU only decodes, so use them."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------- decoding


_fast_jpeg_ok: bool | None = None  # does torchvision decode JPEGs to PIL's pixels? (checked once per process)
_jpeg_op = None  # torchvision's libjpeg-turbo decode op, resolved once (False: not available)


def torchvision_jpeg():
    """torchvision's JPEG decode op, called directly: the public wrapper warns on every call that
    torchvision's image I/O is deprecated. Without it (a future torchvision), PIL decodes."""
    global _jpeg_op
    if _jpeg_op is None:
        try:
            from torchvision.io.image import ImageReadMode, _has_image_ops

            op = torch.ops.image.decode_jpeg if _has_image_ops() else None
            mode = ImageReadMode.UNCHANGED.value
            _jpeg_op = (lambda data: op(data, mode, False)) if op is not None else False
        except Exception:  # no torchvision image extension
            _jpeg_op = False
    return _jpeg_op


def _jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale PIL's `draft` picks for a size×size target (as `data.load_image` asks for)."""
    scale = min(width // size, height // size)
    for s in (8, 4, 2, 1):
        if scale >= s:
            return s
    return 1


def _hwc(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 copy of an RGB PIL image."""
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def _pil_sizes(raw: bytes, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """`load_image` semantics, one decode per distinct draft scale; (H, W, 3) tensors."""
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
            rgb = img.convert("RGB")
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
    except Exception:  # unsupported variant (arithmetic coding, lossless...) or another op signature: PIL decides
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


def _decode_hwc(path: str, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    raw = _read(path)
    pixels = _fast_jpeg(raw)
    if pixels is None:
        return _pil_sizes(raw, sizes)
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


def decode_sizes(path: str, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """The image at `path` as (3, S, S) uint8 for each S in `sizes`: read and decoded once,
    resized per size; equal to `pil_to_uint8(load_image(path, S))` for each S."""
    return {size: image.permute(2, 0, 1) for size, image in _decode_hwc(path, sizes).items()}


def decode_batch(paths: Sequence[str], sizes: Sequence[int], pin: bool = False) -> tuple[list[torch.Tensor], str]:
    """One uint8 (B, 3, S, S) tensor per size (channels-last in memory: images stack as decoded),
    and the first decode error ("" if none).

    Errors are returned, not raised, so loader processes hand back a one-line message."""
    images: list[list[torch.Tensor]] = [[] for _ in sizes]
    for path in paths:
        try:
            decoded = _decode_hwc(path, sizes)
        except Exception as exc:  # missing, truncated or not an image: reported with the file's name
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return [], f"{path}: cannot decode image ({type(exc).__name__}: {reason})"
        for per_size, size in zip(images, sizes):
            per_size.append(decoded[size])
    batches = []
    for per_size, size in zip(images, sizes):
        hwc = torch.stack(per_size) if per_size else torch.empty(0, size, size, 3, dtype=torch.uint8)
        batches.append((hwc.pin_memory() if pin else hwc).permute(0, 3, 1, 2))
    return batches, ""


class _BatchDataset(torch.utils.data.Dataset):
    """Item i = batch i, decoded in a loader process."""

    def __init__(self, chunks: list[list[str]], sizes: list[int]):
        self.chunks, self.sizes = chunks, sizes

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        return decode_batch(self.chunks[i], self.sizes)


class ImageBatches:
    """Batches of the images at `paths`, in order: lists of uint8 (B, 3, S, S), one per size.

    `workers` > 0: that many loader processes. `workers` = 0: decoded in this process, by one
    background thread `prefetch` batches ahead when `background` (worth it when the model runs on
    another device: the thread fills the time the CPU waits for the GPU), else inline (on the CPU
    a thread would compete with the model for the cores, and torchvision's decoder holds the GIL)."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], batch_size: int, *, workers: int = 0,
                 background: bool = False, prefetch: int = 2, pin: bool = False):
        if batch_size < 1:
            raise UserError(f"--batch-size must be ≥ 1 (got {batch_size})")
        self.paths, self.sizes = list(paths), list(sizes)
        self.chunks = [self.paths[i:i + batch_size] for i in range(0, len(self.paths), batch_size)]
        self.workers, self.background, self.prefetch, self.pin = workers, background, max(1, prefetch), pin

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.workers > 0:
            source = self._processes()
        elif self.background:
            source = self._thread()
        else:
            source = (decode_batch(chunk, self.sizes, self.pin) for chunk in self.chunks)
        for batches, error in source:
            if error:
                raise UserError(f"{error}; fix or remove this image (and any other unreadable ones)")
            yield batches

    def _thread(self):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aicoss-decode") as pool:
            pending = [pool.submit(decode_batch, c, self.sizes, self.pin) for c in self.chunks[:self.prefetch]]
            for i in range(len(self.chunks)):
                result = pending[i].result()
                pending[i] = None  # free the batch once consumed
                if i + self.prefetch < len(self.chunks):
                    pending.append(pool.submit(decode_batch, self.chunks[i + self.prefetch], self.sizes, self.pin))
                yield result

    def _processes(self):
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self.chunks, self.sizes), batch_size=None, shuffle=False, num_workers=self.workers,
            pin_memory=self.pin, prefetch_factor=self.prefetch)
        yield from loader


# --------------------------------------------------------------------------- members and the forward pass


@dataclass
class Member:
    """One model of an ensemble (a `predict` is an ensemble of one)."""

    path: str
    model: torch.nn.Module
    img_size: int
    classes: list[str]
    weight: float = 1.0
    tta: str = "none"
    meta: object = None  # its CheckpointMeta


class _Normalizer:
    """`data.normalize` into a new float32 tensor of the given memory format (same arithmetic, same
    bits): the uint8 → float conversion and the layout change are one copy."""

    def __init__(self, device: torch.device, memory_format: torch.memory_format):
        self.shift = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
        return x.copy_(images).sub_(self.shift).div_(self.scale)


@torch.inference_mode()
def member_probabilities(
    members: Sequence[Member],
    batches: ImageBatches,
    n_images: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sigmoid outputs (M, n, K) float32 on the CPU, member by member on each batch.

    A member with TTA averages the sigmoid outputs of its flipped views."""
    if not members:
        raise ValueError("no members")
    num_classes = len(members[0].classes)
    size_index = {s: i for i, s in enumerate(batches.sizes)}
    out = torch.empty(len(members), n_images, num_classes, device=device)
    norm = _Normalizer(device, torch.channels_last if channels_last else torch.contiguous_format)
    non_blocking = device.type == "cuda"
    for m in members:
        m.model.eval()
    pos = 0
    for images in batches:
        inputs = {size: norm(images[i].to(device, non_blocking=non_blocking)) for size, i in size_index.items()}
        n = len(images[0])
        for k, member in enumerate(members):
            x = inputs[member.img_size]
            views = TTA_VIEWS[member.tta]
            target = out[k, pos:pos + n]
            for j, dims in enumerate(views):
                with autocast(device, amp_dtype):
                    logits = member.model(torch.flip(x, dims) if dims else x)
                probs = torch.sigmoid(logits.float())
                if j == 0:
                    target.copy_(probs)
                else:
                    target.add_(probs)
            if len(views) > 1:
                target.div_(len(views))
        pos += n
        if on_batch:
            on_batch(n)
    if pos != n_images:
        raise RuntimeError(f"expected {n_images} images, got {pos}")
    return out.cpu()


def combine(probs: torch.Tensor, weights: Sequence[float] | np.ndarray | None = None) -> torch.Tensor:
    """Weighted mean over members of (M, n, K) probabilities (weights ≥ 0, normalised to sum 1)."""
    m = probs.shape[0]
    w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(
        np.asarray(weights, dtype=np.float64))
    w = w / w.sum()
    return torch.einsum("m,mnk->nk", w, probs.double()).float()
