"""torch.distributed plumbing: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this setup() joined the process group, so its teardown leaves it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes; a plain `aicoss train` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


def teardown(info: DistInfo) -> None:
    """Leave the process group if this `setup` joined it; one joined around several runs (the folds
    of a cross-validation) stays, since joining again after leaving is not reliable."""
    if info.active and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def broadcast_object(info: DistInfo, value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not info.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(info: DistInfo, tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into these tensors on every rank (in place)."""
    if info.active:
        for t in tensors:
            dist.broadcast(t, src=0)


def all_gather_objects(info: DistInfo, value: Any) -> list[Any]:
    if not info.active:
        return [value]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    if info.active:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_rows(info: DistInfo, local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's rows in rank order. Shards are contiguous and unpadded
    (`data.samplers.shard`), so the result is exactly the single-process order, with no duplicates."""
    if not info.active:
        return local
    sizes = all_gather_objects(info, int(local.shape[0]))
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)])
