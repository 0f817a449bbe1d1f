"""One optimizer step of the training loop, and the optimizer, grad scaler and EMA it drives.

`TrainStep.backward` runs one micro-batch (forward, loss, backward; DDP's gradient sync only on the
last micro-batch of the step); `TrainStep.optimize` steps the optimizer through the grad scaler,
which skips the update on the device when a gradient is not finite, then updates the EMA. Neither
reads anything back to the host, so a GPU never waits for the CPU here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aicoss_cli.base.runtime import Runtime

if TYPE_CHECKING:
    from aicoss_cli.train.distill import TeacherTargets


def learning_rate(optim, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up per step over `warmup_epochs`, then cosine annealing from lr to min_lr,
    stepped per epoch as the seed's CosineAnnealingLR(T_max=epochs) was:
    lr_e = min_lr + (lr − min_lr)·(1 + cos(π·e/E))/2, e counted from the end of the warm-up."""
    if epoch < optim.warmup_epochs:
        done = epoch * steps_per_epoch + step + 1
        return optim.lr * done / (optim.warmup_epochs * steps_per_epoch)
    e, total = epoch - optim.warmup_epochs, optim.epochs - optim.warmup_epochs
    return optim.min_lr + (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * e / total)) / 2


def build_optimizer(model: torch.nn.Module, optim, rt: Runtime) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """AdamW (fused: it reads the scaler's inf flag on the device) and the grad scaler: dynamic
    loss scaling in fp16; a fixed scale of 1 otherwise, where it only skips non-finite steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
    fp16 = rt.amp_dtype is torch.float16
    scaler = torch.amp.GradScaler(rt.device.type, init_scale=2.0**16 if fp16 else 1.0,
                                  growth_interval=2000 if fp16 else 2**31 - 1)
    return optimizer, scaler


def build_ema(model: torch.nn.Module, optim):
    """timm's ModelEmaV3 of the weights (`[optim] ema_decay`), updated after every optimizer step with
    timm's step count (the first update copies the weights); None when off."""
    if optim.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=optim.ema_decay, use_warmup=optim.ema_warmup)


@dataclass
class TrainStep:
    model: torch.nn.Module  # what the loop calls (DDP-wrapped, compiled)
    raw_model: torch.nn.Module  # the model itself, which the EMA follows
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: object | None
    rt: Runtime
    micro_scale: float  # loss scale so that a step follows the gradient of the recipe's loss on the global batch
    clip_grad_norm: float | None = None
    distributed: bool = False

    def backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool,
                 teacher: TeacherTargets | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of one micro-batch, both detached, after its backward pass; with a `teacher`
        the loss is the distillation loss (`distill.distill_loss`) around the recipe's."""
        no_sync = self.distributed and not last_micro
        with (self.model.no_sync() if no_sync else contextlib.nullcontext()):
            with self.rt.autocast():
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y) if teacher is None else teacher.loss(self.loss_fn, logits.float(), y)
            self.scaler.scale(loss * self.micro_scale).backward()
        return logits.detach(), loss.detach()

    def optimize(self, lr: float, global_step: int) -> None:
        """Apply the step's gradients at `lr` (skipped on the device if one is not finite); then the EMA."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model, step=global_step)
