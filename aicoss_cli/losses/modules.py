"""The losses as `nn.Module`s: each validates its parameters with its `Params` model, runs its pure
function with autocast off, and carries `reduction` ("mean" or "sum"): how it aggregates over
samples. The seed tuned its learning rates with these reductions, so they are part of the
definition; the Trainer reads the attribute to scale gradients under accumulation and DDP.
The class prior of P-ASL is set on its module (`set_prior`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.functional import asymmetric_loss, bce_loss, partial_selective_loss, two_way_loss, zlpr_loss
from aicoss_cli.losses.params import (
    AsymmetricParams,
    LossParams,
    NoParams,
    PartialSelectiveParams,
    TwoWayParams,
    _param_error,
)


def _prior_tensor(values: object) -> Tensor | None:
    """A prior as a 1-D float32 tensor of values in [0, 1]; None/False mean no prior."""
    if values is None or values is False:
        return None
    if isinstance(values, (str, bytes)):
        raise UserError(
            f"[loss] prior must be a list of class frequencies in [0, 1] here (got {values!r}); "
            "a prior source such as 'labels' or a CSV path is resolved before the loss is built"
        )
    try:
        prior = torch.as_tensor(values, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"[loss] prior must be a sequence of numbers in [0, 1] ({err})") from None
    if prior.dim() != 1 or prior.numel() == 0:
        raise UserError(
            f"[loss] prior must be one value per class (got shape {tuple(prior.shape)})"
        )
    bad = (~torch.isfinite(prior)) | (prior < 0) | (prior > 1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise UserError(
            f"[loss] prior values must lie in [0, 1] (class index {first}: {prior[first].item()})"
        )
    return prior


class _Loss(nn.Module):
    """Base: validates the parameters with the loss's `Params` model (and keeps them as attributes);
    forward runs the pure function with autocast off, so the math stays in float32."""

    reduction = "mean"
    description = ""
    aliases: tuple[str, ...] = ()
    Params: type[LossParams] = NoParams

    def __init__(self, **params: object) -> None:
        super().__init__()
        try:
            self.params = self.Params(**params)
        except ValidationError as exc:
            raise _param_error(self.Params, exc) from None
        for name, value in self.params:
            setattr(self, name, value)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        device_type = logits.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            return self.compute(logits, targets)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError


class ZLPRLoss(_Loss):
    __doc__ = zlpr_loss.__doc__
    reduction = "mean"
    description = "ZLPR / multilabel categorical cross-entropy, mean over samples"
    aliases = ("multilabel_categorical_crossentropy",)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return zlpr_loss(logits, targets)


class TwoWayLoss(_Loss):
    __doc__ = two_way_loss.__doc__
    reduction = "mean"
    description = "Two-way multi-label loss (tp, tn temperatures), mean over classes + samples"
    aliases = ("TwoWayLoss",)
    Params = TwoWayParams

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return two_way_loss(logits, targets, self.params)


class PartialSelectiveLoss(_Loss):
    __doc__ = partial_selective_loss.__doc__
    reduction = "sum"
    description = "Partial asymmetric loss (P-ASL) with selective unannotated labels, sum"
    aliases = ("PartialSelectiveLoss", "pasl")
    Params = PartialSelectiveParams

    def __init__(self, prior: Sequence[float] | Tensor | None = None, **params: object) -> None:
        if isinstance(params.get("partial_mode"), str):
            params["partial_mode"] = params["partial_mode"].lower()
        super().__init__(**params)
        self.register_buffer("prior", _prior_tensor(prior), persistent=False)

    def set_prior(self, values: Sequence[float] | Tensor | None) -> None:
        """Give (or clear, with None) the class prior used by the "selective" mode."""
        self.prior = _prior_tensor(values)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.prior is not None and self.prior.device != logits.device:
            self.prior = self.prior.to(logits.device)  # once, not a host copy every step
        return partial_selective_loss(logits, targets, self.params, self.prior)


class AsymmetricLoss(_Loss):
    __doc__ = asymmetric_loss.__doc__
    reduction = "sum"
    description = "Asymmetric loss (ASL), -1 labels ignored, sum"
    aliases = ("AsymmetricLoss",)
    Params = AsymmetricParams

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return asymmetric_loss(logits, targets, self.params)


class BCELogitLoss(_Loss):
    __doc__ = bce_loss.__doc__
    reduction = "mean"
    description = "Binary cross-entropy with logits, mean over annotated entries"
    aliases = ("BCELogitLoss",)

    def compute(self, logits: Tensor, targets: Tensor) -> Tensor:
        return bce_loss(logits, targets)
