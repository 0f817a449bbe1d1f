"""Which rows each process trains and validates on, and the DataLoader over them.

`TrainBatches` makes the same recipe train on the same images per optimizer step whatever the
number of processes and accumulation steps (and continue exactly on resume); `shard` splits the
val rows without padding; `make_loader` keeps the loader off the global RNG.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.transforms import sample_seed


def micro_batch_size(global_batch: int, accumulation: int, world: int) -> int:
    """Images per forward pass on one process: the global batch split into accumulation × processes
    equal micro-batches."""
    if global_batch % (accumulation * world):
        raise UserError(
            f"[optim] batch_size {global_batch} must be divisible by grad_accumulation × processes = "
            f"{accumulation} × {world}"
        )
    return global_batch // (accumulation * world)


class TrainBatches(torch.utils.data.Sampler):
    """The micro-batches one rank trains on in one epoch.

    The epoch's order is a seeded permutation of the training rows; optimizer step t takes rows
    [t·B, (t+1)·B) of it (B = the global batch), split into `accumulation` × `world` micro-batches,
    so the same recipe sees the same images per step on 1 GPU or N, and a resumed run (start_step)
    continues exactly where it stopped. Rows that do not fill a last step are dropped.
    """

    def __init__(self, rows: np.ndarray, global_batch: int, accumulation: int, rank: int, world: int,
                 seed: int, epoch: int, start_step: int = 0, augment: bool = True):
        self.micro = micro_batch_size(global_batch, accumulation, world)
        self.rows, self.batch, self.k = np.asarray(rows), global_batch, accumulation
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.start_step, self.augment = start_step, augment

    @property
    def steps(self) -> int:
        return len(self.rows) // self.batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.k

    def __iter__(self) -> Iterator[list]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = self.rows[torch.randperm(len(self.rows), generator=g).numpy()]
        for step in range(self.start_step, self.steps):
            chunk = order[step * self.batch:(step + 1) * self.batch]
            for m in range(self.k):
                lo = (m * self.world + self.rank) * self.micro
                part = chunk[lo:lo + self.micro]
                if self.augment:
                    yield [(int(i), sample_seed(self.seed, self.epoch, int(i))) for i in part]
                else:
                    yield [int(i) for i in part]


def shard(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of `rows` (no padding, so no duplicates to remove later)."""
    bounds = np.linspace(0, len(rows), world + 1).round().astype(int)
    return np.asarray(rows)[bounds[rank]:bounds[rank + 1]]


def make_loader(dataset, batch_sampler, num_workers: int, pin_memory: bool, worker_init_fn=None):
    """A DataLoader over explicit batches. Its own generator keeps it from drawing on the global
    torch RNG, so creating a loader does not shift dropout noise (exact resume relies on it)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=4 if num_workers > 0 else None,
    )
