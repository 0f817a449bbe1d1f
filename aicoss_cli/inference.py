"""Decoding and THE forward loop: validation, the training submission, the P-ASL prior, predict,
ensemble and benchmark all get their scores from `forward`.

The loop keeps the model busy: each image is read and decoded once per batch (resized per member
size) into uint8 tensors, by loader processes or a background thread while a GPU computes, inline
on the CPU (where anything else competes with the model for the cores); the tensors are pinned on
CUDA, copied non-blocking and normalised on the device; outputs stay tensors until the end (no
per-batch `.tolist()`).

Pixels are exactly those of `data.load_image` (what training saw): JPEGs are decoded by
torchvision's libjpeg-turbo when that gives the same pixels as PIL (checked once per process) and
by PIL otherwise; resizing is always PIL's.
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from aicoss_cli.checkpoint import CheckpointMeta, atomic_path, model_from_checkpoint, read_meta
from aicoss_cli.data import IMAGENET_MEAN, IMAGENET_STD, refuse_decompression_bombs, too_many_pixels
from aicoss_cli.errors import UserError
from aicoss_cli.runtime import Runtime

TTA_MODES = ("none", "hflip", "flips")
# flip dims of each view on a (B, 3, H, W) batch: identity, horizontal, vertical, both
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "hflip": ((), (3,)),
    "flips": ((), (3,), (2,), (2, 3)),
}


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
    refuse_decompression_bombs()
    for path in paths:
        try:
            decoded = _decode_hwc(path, sizes)
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
        # a private generator: the loader's worker seeds must not draw on the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self.chunks, self.sizes), batch_size=None, shuffle=False, num_workers=self.workers,
            pin_memory=self.pin, prefetch_factor=self.prefetch, generator=torch.Generator().manual_seed(0))
        yield from loader


# --------------------------------------------------------------------------- members


@dataclass
class MemberSource:
    """Where a member comes from: a checkpoint (or exported model) and its ensemble settings."""

    path: Path
    weight: float | None = None
    tta: str | None = None


@dataclass
class Member:
    """One model of an ensemble (a `predict`, a validation pass, a prior pass: an ensemble of one).

    `model` is a torch module giving logits, or an exported model with a `probabilities(x)` method."""

    path: str
    model: Any
    img_size: int
    classes: list[str]
    weight: float = 1.0
    tta: str = "none"
    meta: CheckpointMeta | None = None

    def outputs(self, x: torch.Tensor, runtime: Runtime, logits: bool = False) -> torch.Tensor:
        """(B, K) float32 probabilities (averaged over the TTA views), or the plain logits."""
        views = TTA_VIEWS[self.tta]
        if logits:
            if len(views) > 1 or not isinstance(self.model, torch.nn.Module):
                raise ValueError("logits need a torch model without TTA")
            with runtime.autocast():
                return self.model(x).float()
        total = None
        for dims in views:
            view = torch.flip(x, dims) if dims else x
            if isinstance(self.model, torch.nn.Module):
                with runtime.autocast():
                    probs = torch.sigmoid(self.model(view).float())
            else:
                probs = self.model.probabilities(view).to(x.device)
            total = probs if total is None else total.add_(probs)
        return total.div_(len(views)) if len(views) > 1 else total


def is_onnx(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def member_meta(path: str | Path) -> CheckpointMeta:
    """The metadata of a member: a checkpoint's (its header only), or an exported ONNX model's."""
    if is_onnx(path):
        from aicoss_cli.onnx_model import OnnxModel

        return OnnxModel.load(path).meta
    return read_meta(path)


def load_members(sources: Sequence[MemberSource], rt: Runtime, default_tta: str = "none", progress=None) -> list[Member]:
    """Rebuild each member's model from its checkpoint, on the device, in eval mode; an exported
    `.onnx` member runs in ONNX Runtime on the CPU (its threads sleep between batches, leaving the
    cores to decoding)."""
    torchvision_jpeg()  # import the decoder now, not inside the first batch
    if default_tta not in TTA_MODES:
        raise UserError(f"--tta must be one of {', '.join(TTA_MODES)} (got {default_tta!r})")
    task = progress.add_task("loading checkpoints", total=len(sources)) if progress else None
    members = []
    for src in sources:
        if is_onnx(src.path):
            from aicoss_cli.onnx_model import OnnxModel

            model = OnnxModel.load(src.path, spin=False)
            meta = model.meta
        else:
            model, meta = model_from_checkpoint(src.path)
            model.to(rt.device)
            if rt.channels_last:
                model.to(memory_format=torch.channels_last)
        weight = 1.0 if src.weight is None else float(src.weight)
        members.append(Member(path=str(src.path), model=model, img_size=meta.img_size, classes=meta.classes,
                              weight=weight, tta=src.tta or default_tta, meta=meta))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return members


# --------------------------------------------------------------------------- the forward loop


class Normalizer:
    """`data.normalize` into a new float32 tensor of the given memory format (same arithmetic, same
    bits): the uint8 → float conversion and the layout change are one copy."""

    def __init__(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.shift = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
        return x.copy_(images).sub_(self.shift).div_(self.scale)


@torch.inference_mode()
def forward(members: Sequence[Member], paths: Sequence[str], rt: Runtime, batch_size: int, *,
            logits: bool = False, progress=None, what: str = "images",
            on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """(M, n, K) float32 on the CPU: every member's sigmoid outputs (or logits) on the images at
    `paths`, in order. Each image is decoded once per batch and resized per member size; the members
    run one after another on the batch, in eval mode (a member's train/eval mode is restored after)."""
    if not members:
        raise ValueError("no members")
    sizes = sorted({m.img_size for m in members})
    batches = ImageBatches(paths, sizes, batch_size, workers=rt.workers, background=rt.background, pin=rt.pin)
    size_index = {s: i for i, s in enumerate(sizes)}
    out = torch.empty(len(members), len(paths), len(members[0].classes), device=rt.device)
    norm = Normalizer(rt.device, torch.channels_last if rt.channels_last else torch.contiguous_format)
    modes = [m.model.training if isinstance(m.model, torch.nn.Module) else None for m in members]
    task = progress.add_task(what, total=len(paths)) if progress else None
    pos = 0
    try:
        for m in members:
            if isinstance(m.model, torch.nn.Module):
                m.model.eval()
        for images in batches:
            inputs = {size: norm(images[i].to(rt.device, non_blocking=rt.pin)) for size, i in size_index.items()}
            n = len(images[0])
            for k, member in enumerate(members):
                out[k, pos:pos + n] = member.outputs(inputs[member.img_size], rt, logits=logits)
            pos += n
            if progress:
                progress.advance(task, n)
            if on_batch:
                on_batch(n)
    finally:
        for m, mode in zip(members, modes):
            if mode is not None:
                m.model.train(mode)
        if progress:
            progress.remove_task(task)
    if pos != len(paths):
        raise RuntimeError(f"expected {len(paths)} images, got {pos}")
    return out.cpu()


def combine(probs: torch.Tensor, weights: Sequence[float] | np.ndarray | None = None) -> torch.Tensor:
    """Weighted mean over members of (M, n, K) probabilities (weights ≥ 0, normalised to sum 1)."""
    m = probs.shape[0]
    w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(
        np.asarray(weights, dtype=np.float64))
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not 0 < float(w.sum()) < float("inf"):
        raise ValueError(f"member weights must be finite, ≥ 0 and have a positive finite sum (got {w.tolist()})")
    w = w / w.sum()
    return torch.einsum("m,mnk->nk", w, probs.double()).float()


def write_scores_csv(path, ids: Sequence[str], classes: Sequence[str], probs: torch.Tensor | np.ndarray) -> None:
    """img_id + one probability column per class, written atomically; UserError if it cannot be."""
    import pandas as pd

    values = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    bad = ~np.isfinite(values)
    if bad.any():  # an empty cell in a submission scores as nothing: never write one
        row, col = map(int, np.argwhere(bad)[0])
        raise UserError(f"{path}: not written: {int(bad.sum())} of {values.size} probabilities are not finite (first: "
                        f"img_id {ids[row]!r}, class {classes[col]!r}); the model's weights or outputs are NaN or "
                        "infinite: check the checkpoint (did its run stop on a non-finite loss?) or run in fp32")
    frame = pd.DataFrame(values, columns=list(classes))
    frame.insert(0, "img_id", list(ids))
    try:
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.7g")
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc})") from None
