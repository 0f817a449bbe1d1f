"""Where and how models run: device, precision, autocast, loader workers, seeding.

One policy for training and inference: `aicoss train` builds its `Runtime` from the recipe's
`[runtime]` section, `predict` / `ensemble` / `benchmark-fp16` from their options, and both go
through the same functions, so "fp16 on a CPU" or "bf16 on an old GPU" mean the same everywhere.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from aicoss_cli.base.errors import UserError


def select_device(spec: str, where: str = "--device", local_rank: int | None = None) -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; `where` names the option in errors.
    Under torchrun (`local_rank` given), a plain "cuda" means this process's own GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"{where} {spec}: no CUDA device is available; use auto or cpu")
        if spec == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision context for `dtype` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers(device: torch.device) -> int:
    """Loader processes for inference by default: none on the CPU, where one decode thread costs
    least (loader processes compete with the model for the cores and copy every batch between
    processes; measured in bench/inference_overhead.py); on CUDA the CPU only decodes, so use them."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """Device, autocast dtype (None = fp32), loader processes and memory format of one job."""

    device: torch.device
    amp_dtype: torch.dtype | None
    workers: int
    channels_last: bool
    notes: list[str] = field(default_factory=list)

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda"

    @property
    def background(self) -> bool:
        """Decode in one background thread when there are no loader processes: it decodes the next
        batch while the model runs (on the CPU too, where PIL and libjpeg release the GIL; decoding
        inline measured slower in bench/inference_overhead.py)."""
        return self.workers == 0

    @property
    def precision(self) -> str:
        return dtype_name(self.amp_dtype)

    @property
    def loader(self) -> str:
        if self.workers:
            return f"{self.workers} loader processes"
        return "1 decode thread"

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def with_precision(self, amp_dtype: torch.dtype | None) -> Runtime:
        return Runtime(self.device, amp_dtype, self.workers, self.channels_last, self.notes)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        if self.device.type == "cuda":
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = f"cpu ({torch.get_num_threads()} threads)"
        return f"{where}, {self.precision}, {self.loader}"


def make_runtime(device: str, precision: str, num_workers: int | None = None, *, channels_last: bool | str = "auto",
                 local_rank: int | None = None, where: str = "--device") -> Runtime:
    """The runtime of a job: `num_workers` None takes `default_workers`; channels_last "auto" means
    on CUDA only (where convolutions run faster in it)."""
    dev = select_device(device, where=where, local_rank=local_rank)
    notes: list[str] = []
    amp = precision_dtype(precision, dev, notes)
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be ≥ 0 (got {num_workers})")
    workers = default_workers(dev) if num_workers is None else num_workers
    memory = channels_last is True or (channels_last == "auto" and dev.type == "cuda")
    return Runtime(dev, amp, workers, memory, notes)


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels (bit-exact resume), else cuDNN's autotuner for fixed input sizes."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
