"""Forward passes over a data set: the shared core of validation, predict, ensemble and benchmark.

The loop keeps the device busy: uint8 batches are copied (pinned, non-blocking on CUDA) and
normalised on the device, outputs stay tensors until the end (no per-batch `.tolist()`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from aicoss_cli.data import normalize
from aicoss_cli.errors import UserError


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
