"""THE forward loop and its members: validation, the training submission, the P-ASL prior,
predict, ensemble and benchmark all get their scores from `forward`.

The loop keeps the model busy: each image is read and decoded once per batch (resized per member
size) into uint8 tensors (`data.loading.ImageBatches`, through the one decoder, so the pixels are
those training saw), by loader processes or a background thread; the tensors are pinned on CUDA,
copied non-blocking and normalised on the device; outputs stay tensors until the end (no
per-batch `.tolist()`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.runtime import Runtime
from aicoss_cli.data.images import torchvision_jpeg
from aicoss_cli.data.loading import ImageBatches, Normalizer
from aicoss_cli.models.checkpoint import CheckpointMeta, model_from_checkpoint, read_meta

TTA_MODES = ("none", "hflip", "flips")
# flip dims of each view on a (B, 3, H, W) batch: identity, horizontal, vertical, both
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "hflip": ((), (3,)),
    "flips": ((), (3,), (2,), (2, 3)),
}


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
    exif_transpose: bool = False  # its recipe's [data] exif_transpose: images upright by their EXIF orientation

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
        from aicoss_cli.infer.onnx_model import OnnxModel

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
            from aicoss_cli.infer.onnx_model import OnnxModel

            model = OnnxModel.load(src.path, spin=False)
            meta = model.meta
        else:
            model, meta = model_from_checkpoint(src.path)
            model.to(rt.device)
            if rt.channels_last:
                model.to(memory_format=torch.channels_last)
        weight = 1.0 if src.weight is None else float(src.weight)
        members.append(Member(path=str(src.path), model=model, img_size=meta.img_size, classes=meta.classes,
                              weight=weight, tta=src.tta or default_tta, meta=meta,
                              exif_transpose=meta.exif_transpose))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return members


# --------------------------------------------------------------------------- the forward loop


@torch.inference_mode()
def forward(members: Sequence[Member], paths: Sequence[str], rt: Runtime, batch_size: int, *,
            logits: bool = False, progress=None, what: str = "images",
            on_batch: Callable[[int], None] | None = None,
            member_seconds: list[float] | None = None) -> torch.Tensor:
    """(M, n, K) float32 on the CPU: every member's sigmoid outputs (or logits) on the images at
    `paths`, in order. Each image is decoded once per batch and resized per member size; the members
    run one after another on the batch, in eval mode (a member's train/eval mode is restored after).
    `member_seconds` (one float per member) gets each member's own time added: its forward on the
    decoded batch, decoding excluded (on CUDA the device is synchronised around it)."""
    if not members:
        raise ValueError("no members")
    if len({m.exif_transpose for m in members}) > 1:
        raise UserError(f"{members[0].path}, {members[-1].path}: one was trained on images turned upright by their EXIF "
                        "orientation and one on the pixels as stored ([data] exif_transpose); ensemble members must "
                        "see the same pixels")
    sizes = sorted({m.img_size for m in members})
    batches = ImageBatches(paths, sizes, batch_size, workers=rt.workers, background=rt.background, pin=rt.pin,
                           exif_transpose=members[0].exif_transpose)
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
                start = _clock(rt) if member_seconds is not None else 0.0
                out[k, pos:pos + n] = member.outputs(inputs[member.img_size], rt, logits=logits)
                if member_seconds is not None:
                    member_seconds[k] += _clock(rt) - start
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


def _clock(rt: Runtime) -> float:
    """perf_counter once the device's queued work is done (CUDA kernels run asynchronously)."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    return time.perf_counter()


def require_finite(probs: torch.Tensor, members: Sequence[Member], paths: Sequence[str]) -> None:
    """`forward`'s (M, n, K) outputs must all be finite: else a UserError naming the first member
    with a NaN or infinite output (damaged weights), raised before anything is written."""
    for member, outputs in zip(members, probs):
        bad = ~torch.isfinite(outputs)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise UserError(f"{member.path}: {int(bad.sum())} of {bad.numel()} outputs are not finite (first: "
                            f"{Path(paths[row]).name}, class {member.classes[col]!r}): its weights are NaN or "
                            "infinite (did its run stop on a non-finite loss?); nothing written")


def combine(probs: torch.Tensor, weights: Sequence[float] | np.ndarray | None = None) -> torch.Tensor:
    """Weighted mean over members of (M, n, K) probabilities (weights ≥ 0, normalised to sum 1)."""
    m = probs.shape[0]
    w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(
        np.asarray(weights, dtype=np.float64))
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not 0 < float(w.sum()) < float("inf"):
        raise ValueError(f"member weights must be finite, ≥ 0 and have a positive finite sum (got {w.tolist()})")
    w = w / w.sum()
    return torch.einsum("m,mnk->nk", w.to(probs.device), probs.double()).float()


