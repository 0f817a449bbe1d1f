"""Images into the model: `ImageDataset` (training items, augmented), `ImageBatches` (inference
batches, every size an ensemble needs from one decode), and the normalisation done on the device.

Both decode with `images.decode_image` / `images.decode_batch` and hand over uint8 tensors, which
keeps loader work and host-to-device copies small; normalising to ImageNet statistics happens where
the tensor lives (`normalize`, `Normalizer`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.images import decode_batch, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, (x/255 − mean)/std, computed where the tensor lives (the device).

    Every model takes ImageNet-normalised input; a backbone trained on other statistics
    re-normalises inside the model, so data code never depends on the arch."""
    scale = torch.tensor(std, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255.0
    return (images.to(dtype) - shift) / scale


class ImageDataset(torch.utils.data.Dataset):
    """Items are (uint8 image (3, S, S), labels (K,) float32, row index, error text).

    A key is a row index (no augmentation) or (row index, sample seed) (augmented under that
    seed). A file that fails to decode yields a zero image and the error text instead of raising,
    so the training loop can stop cleanly with the file's name. `exif_transpose`: images upright
    by their EXIF orientation (`[data] exif_transpose`).
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray | None, img_size: int, transform=None,
                 exif_transpose: bool = False):
        self.paths = list(paths)
        self.labels = None if labels is None else torch.from_numpy(labels.astype(np.float32))
        self.img_size = img_size
        self.transform = transform
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        target = self.labels[index] if self.labels is not None else torch.zeros(0)
        try:
            image = decode_image(self.paths[index], self.img_size, self.exif_transpose)
        except Exception as exc:  # any decode failure becomes a reported error, never a crash in a worker
            blank = torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8)
            return blank, target, index, f"{self.paths[index]}: cannot decode image ({type(exc).__name__}: {exc})"
        if self.transform is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, target, index, ""

    def __getitems__(self, keys: list) -> list:
        """A batch of items (the DataLoader's batched fetch), made with one intra-op thread: on
        tensors this small torch's thread pool costs far more than it gains — RandAugment ran 10×
        slower with 2 threads than with 1 on 2 cores (bench/train_overhead.py) — and with
        `num_workers = 0` that pool is the model's."""
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return [self[key] for key in keys]
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


class Normalizer:
    """`normalize` into a new float32 tensor of the given memory format (same arithmetic, same
    bits): the uint8 → float conversion and the layout change are one copy."""

    def __init__(self, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):
        self.shift = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.scale = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
        self.memory_format = memory_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
        return x.copy_(images).sub_(self.shift).div_(self.scale)


class _BatchDataset(torch.utils.data.Dataset):
    """Item i = batch i, decoded in a loader process."""

    def __init__(self, chunks: list[list[str]], sizes: list[int], exif_transpose: bool):
        self.chunks, self.sizes, self.exif_transpose = chunks, sizes, exif_transpose

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        return decode_batch(self.chunks[i], self.sizes, exif_transpose=self.exif_transpose)


class ImageBatches:
    """Batches of the images at `paths`, in order: lists of uint8 (B, 3, S, S), one per size.

    `workers` > 0: that many loader processes. `workers` = 0: decoded in this process, by one
    background thread `prefetch` batches ahead when `background` (what `Runtime` asks for: the
    thread decodes the next batch while the model computes, on a GPU or on the CPU), else inline.
    `exif_transpose`: images upright by their EXIF orientation (`[data] exif_transpose`)."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], batch_size: int, *, workers: int = 0,
                 background: bool = False, prefetch: int = 2, pin: bool = False, exif_transpose: bool = False):
        if batch_size < 1:
            raise UserError(f"--batch-size must be ≥ 1 (got {batch_size})")
        self.paths, self.sizes = list(paths), list(sizes)
        self.chunks = [self.paths[i:i + batch_size] for i in range(0, len(self.paths), batch_size)]
        self.workers, self.background, self.prefetch, self.pin = workers, background, max(1, prefetch), pin
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.workers > 0:
            source = self._processes()
        elif self.background:
            source = self._thread()
        else:
            source = (self._decode(chunk) for chunk in self.chunks)
        for batches, error in source:
            if error:
                raise UserError(f"{error}; fix or remove this image (and any other unreadable ones)")
            yield batches

    def _decode(self, chunk: list[str]):
        return decode_batch(chunk, self.sizes, self.pin, self.exif_transpose)

    def _thread(self):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aicoss-decode") as pool:
            pending = [pool.submit(self._decode, c) for c in self.chunks[:self.prefetch]]
            for i in range(len(self.chunks)):
                result = pending[i].result()
                pending[i] = None  # free the batch once consumed
                if i + self.prefetch < len(self.chunks):
                    pending.append(pool.submit(self._decode, self.chunks[i + self.prefetch]))
                yield result

    def _processes(self):
        # a private generator: the loader's worker seeds must not draw on the global RNG (exact resume)
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self.chunks, self.sizes, self.exif_transpose), batch_size=None, shuffle=False, num_workers=self.workers,
            pin_memory=self.pin, prefetch_factor=self.prefetch, generator=torch.Generator().manual_seed(0))
        yield from loader
