"""Multi-label losses of the seed, by name: ``build_loss(name, **params)(logits, targets)``.

``logits`` and ``targets`` have shape (N, K); a target is 1 (positive), 0 (negative) or
-1 (not annotated). Every loss computes in float32 (float64 when given float64 logits, for
gradcheck) with autocast switched off, from ``logsigmoid`` / ``logsumexp``, so fp16 and bf16
training give the fp32 value and never NaN, even at logits of +-100.

Each loss class carries ``reduction``: how it aggregates over samples ("mean" or "sum").
The seed tuned its learning rates with these reductions, so they are part of the definition;
the engine reads the attribute to scale gradients under accumulation and DDP.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aicoss_cli.errors import UserError



# ---------------------------------------------------------------------------------------------
# Parameters: one model per loss, the one place a parameter, its default and its range are
# declared (the recipe's [loss] section is built from these models)


class LossParams(BaseModel):
    """Parameters of a loss; numbers must be finite and of the declared type (no "0.5", no true)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class NoParams(LossParams):
    """The loss has no parameter."""


class TwoWayParams(LossParams):
    tp: float = Field(4.0, gt=0, description="two-way loss temperature of positives")
    tn: float = Field(1.0, gt=0, description="two-way loss temperature of negatives")


class AsymmetricParams(LossParams):
    gamma_pos: float = Field(1.0, ge=0, description="focusing exponent on positives")
    gamma_neg: float = Field(4.0, ge=0, description="focusing exponent on negatives")
    clip: float = Field(0.05, ge=0, lt=1, description="probability margin shifted off negatives")


class PartialSelectiveParams(LossParams):
    gamma_pos: float = Field(1.0, ge=0, description="focusing exponent on positives")
    gamma_neg: float = Field(1.0, ge=0, description="focusing exponent on negatives")
    gamma_unann: float = Field(2.0, ge=0, description="focusing exponent on unannotated labels")
    alpha_pos: float = Field(1.0, ge=0, description="weight of positives")
    alpha_neg: float = Field(1.0, ge=0, description="weight of negatives")
    alpha_unann: float = Field(1.0, ge=0, description="weight of unannotated labels")
    clip: float = Field(0.0, ge=0, lt=1, description="probability margin shifted off negatives")
    partial_mode: Literal["negative", "ignore", "selective"] = Field(
        "selective", description="how unannotated (-1) labels are treated")
    prior_threshold: float = Field(0.05, ge=0, le=1, description="classes with a higher prior are ignored")
    likelihood_topk: int = Field(5, ge=0, description="unannotated entries ignored per image")


def _range_text(info) -> str:
    """">= 0 and < 1" from a field's constraints."""
    parts = []
    for item in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(item, attr, None) is not None:
                parts.append(f"{sign} {getattr(item, attr):g}")
    return " and ".join(parts)


def _param_error(params: type[LossParams], exc: ValidationError) -> UserError:
    """A one-line error naming the parameter and what it accepts."""
    first = exc.errors(include_url=False)[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    info = params.model_fields.get(name)
    if info is None:
        return UserError(f"[loss] {name}: {first['msg']}")
    annotation = info.annotation
    if getattr(annotation, "__origin__", None) is Literal:
        what = f"one of {', '.join(annotation.__args__)}"
    else:
        kind = "an integer" if annotation is int else "a number"
        limits = _range_text(info)
        what = f"{kind} {limits}" if limits else kind
    return UserError(f"[loss] {name} must be {what} (got {first.get('input')!r})")


# ---------------------------------------------------------------------------------------------
# Numeric helpers


def _as_float(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Logits in float32 (float64 kept), targets on the logits' device; shapes must match."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(
            f"loss expects logits and targets of the same shape (N, K), "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    s = logits if logits.dtype == torch.float64 else logits.float()
    return s, targets.to(device=s.device)


def _log1p_sum_exp(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """log(1 + sum_{mask} e^x) along ``dim``; an all-masked row gives log(1) = 0, with zero grad."""
    masked = x.masked_fill(~mask, -math.inf)
    zero = torch.zeros_like(masked.narrow(dim, 0, 1))
    return torch.logsumexp(torch.cat([zero, masked], dim=dim), dim=dim)


def _masked_logsumexp(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """log(sum_{mask} e^x) along ``dim``; -inf for an all-masked row, with a finite (zero) grad.

    logsumexp of an all -inf row has a NaN gradient, so such rows are computed on zeros and
    replaced by -inf afterwards.
    """
    has_any = mask.any(dim=dim, keepdim=True)
    filler = torch.where(has_any, -math.inf, 0.0).to(x.dtype)
    lse = torch.logsumexp(torch.where(mask, x, filler), dim=dim)
    return torch.where(has_any.squeeze(dim), lse, -math.inf)


def _log_one_minus_pc(s: Tensor, clip: float) -> Tensor:
    """log(1 - p_c) with 1 - p_c = min(1, sigma(-s) + clip); for clip = 0 this is logsigmoid(-s)."""
    if clip > 0:
        # sigma(-s) + clip >= clip > 0, so the log is finite in float32.
        return torch.log(torch.clamp(torch.sigmoid(-s) + clip, max=1.0))
    return F.logsigmoid(-s)


def _focusing(s: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Detached bases of the focusing factors: (1 - p, p_c) with p_c = max(0, p - clip)."""
    with torch.no_grad():
        one_minus_p = torch.sigmoid(-s)
        p_c = torch.clamp(torch.sigmoid(s) - clip, min=0.0)
    return one_minus_p, p_c


def selective_unannotated_weights(
    logits: Tensor,
    unannotated: Tensor,
    likelihood_topk: int,
    prior: Tensor | None = None,
    prior_threshold: float = 0.05,
) -> Tensor:
    """0/1 weights of the unannotated entries in P-ASL's "selective" mode (no gradient).

    w = 1 on every unannotated entry, except w = 0 on
    - the unannotated entries of classes with prior > prior_threshold (when a prior is given);
    - the likelihood_topk * N unannotated entries most likely positive (highest logit, so
      highest p = sigma(logit); ties go to the lower flat index).
    Annotated entries get w = 0 here (their weight is not this function's business).
    """
    with torch.no_grad():
        keep = unannotated.clone()
        if prior is not None:
            keep &= ~(prior.to(keep.device) > prior_threshold).unsqueeze(0)
        num_top = min(likelihood_topk * logits.shape[0], logits.numel())
        if num_top > 0:
            # annotated entries sort last (-inf); a stable sort keeps ties in index order, and
            # no data-dependent shape means no host sync on the GPU
            scores = logits.detach().masked_fill(~unannotated, -math.inf).reshape(-1)
            top = torch.sort(scores, descending=True, stable=True).indices[:num_top]
            keep = keep.reshape(-1).index_fill(0, top, False).reshape(unannotated.shape)
        return keep.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# The losses as pure functions


def zlpr_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """ZLPR (multilabel categorical cross-entropy), mean over samples i of

        log(1 + sum_{j: y_ij = 0} e^{s_ij}) + log(1 + sum_{j: y_ij = 1} e^{-s_ij})

    with -1 entries left out of both sums.
    """
    s, y = _as_float(logits, targets)
    negative_part = _log1p_sum_exp(s, y == 0, dim=1)
    positive_part = _log1p_sum_exp(-s, y == 1, dim=1)
    return (negative_part + positive_part).mean()


def two_way_loss(logits: Tensor, targets: Tensor, params: TwoWayParams = TwoWayParams()) -> Tensor:
    """Two-way multi-label loss.

    For a set of entries (one class over the batch's samples, or one sample over its classes)
    that holds at least one positive:

        softplus(tn * LSE_{y=0}(s / tn) + tp * LSE_{y=1}(-s / tp))

    (no negative gives LSE = -inf and a term of 0). The loss is the mean of this term over the
    classes with a positive plus its mean over the samples with a positive; 0 when the batch
    has no positive. -1 entries are neither positive nor negative.
    """
    s, y = _as_float(logits, targets)
    positive, negative = y == 1, y == 0
    tp, tn = params.tp, params.tn

    def mean_term(dim: int) -> Tensor:
        lse_neg = _masked_logsumexp(s / tn, negative, dim)
        lse_pos = _masked_logsumexp(-s / tp, positive, dim)
        has_positive = positive.any(dim=dim)
        term = torch.where(has_positive, F.softplus(tn * lse_neg + tp * lse_pos), 0.0)
        return term.sum() / has_positive.sum().clamp(min=1)

    return mean_term(0) + mean_term(1)


def partial_selective_loss(logits: Tensor, targets: Tensor,
                           params: PartialSelectiveParams = PartialSelectiveParams(),
                           prior: Tensor | None = None) -> Tensor:
    """Partial asymmetric loss (P-ASL), summed over the batch:

        -sum_ij  [y=1]  * a+ * (1 - p)^g+   * log p
               + [y=0]  * a- * p_c^g-       * log(1 - p_c)
               + [y=-1] * au * w * p_c^gu   * log(1 - p_c)

    p = sigma(s), 1 - p_c = min(1, 1 - p + clip). The focusing factors (1 - p)^g, p_c^g carry
    no gradient. partial_mode: "negative" (the seed's default) counts every -1 entry as a
    negative with its own focusing, w = 1; "ignore" sets w = 0; "selective" sets w by
    ``selective_unannotated_weights``.
    """
    s, y = _as_float(logits, targets)
    positive, negative, unannotated = y == 1, y == 0, y == -1
    p, clip, partial_mode = params, params.clip, params.partial_mode

    one_minus_p, p_c = _focusing(s, clip)
    with torch.no_grad():
        w_pos = p.alpha_pos * positive * one_minus_p.pow(p.gamma_pos)
        w_neg = p.alpha_neg * negative * p_c.pow(p.gamma_neg)
        if partial_mode == "selective":
            if prior is not None and prior.numel() != s.shape[1]:
                raise UserError(
                    f"[loss] prior has {prior.numel()} values but the model has "
                    f"{s.shape[1]} classes"
                )
            keep = selective_unannotated_weights(
                s, unannotated, p.likelihood_topk, prior, p.prior_threshold
            )
        elif partial_mode == "negative":
            keep = unannotated
        else:
            keep = torch.zeros_like(s)
        w_unann = p.alpha_unann * keep * p_c.pow(p.gamma_unann)

    loss = w_pos * F.logsigmoid(s) + (w_neg + w_unann) * _log_one_minus_pc(s, clip)
    return -loss.sum()


def asymmetric_loss(logits: Tensor, targets: Tensor, params: AsymmetricParams = AsymmetricParams()) -> Tensor:
    """Asymmetric loss (ASL), summed over the batch; -1 entries are ignored:

        -sum_ij [y=1] * (1 - p)^g+ * log p + [y=0] * p_c^g- * log(1 - p_c)

    p = sigma(s), 1 - p_c = min(1, 1 - p + clip); the focusing factors carry no gradient.
    """
    s, y = _as_float(logits, targets)
    one_minus_p, p_c = _focusing(s, params.clip)
    with torch.no_grad():
        w_pos = (y == 1) * one_minus_p.pow(params.gamma_pos)
        w_neg = (y == 0) * p_c.pow(params.gamma_neg)
    loss = w_pos * F.logsigmoid(s) + w_neg * _log_one_minus_pc(s, params.clip)
    return -loss.sum()


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over the annotated entries (y != -1):

        mean_{ij: y != -1}  -(y log p + (1 - y) log(1 - p)),  p = sigma(s)

    0 when no entry is annotated.
    """
    s, y = _as_float(logits, targets)
    annotated = y != -1
    per_entry = F.binary_cross_entropy_with_logits(
        s, torch.where(annotated, y.to(s.dtype), 0.0), reduction="none"
    )
    return torch.where(annotated, per_entry, 0.0).sum() / annotated.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# The prior of P-ASL


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


# ---------------------------------------------------------------------------------------------
# The losses as modules


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


# ---------------------------------------------------------------------------------------------
# Registry

LOSS_CLASSES: dict[str, type[_Loss]] = {
    "zlpr": ZLPRLoss,
    "two_way": TwoWayLoss,
    "partial_selective": PartialSelectiveLoss,
    "asl": AsymmetricLoss,
    "bce": BCELogitLoss,
}

LOSSES: dict[str, str] = {name: cls.description for name, cls in LOSS_CLASSES.items()}


def _normalize(name: str) -> str:
    """Spelling-insensitive key: 'TwoWayLoss', 'two_way' and 'Two-Way' meet."""
    return "".join(ch for ch in name.lower() if ch not in "_- ")


def _spellings() -> dict[str, str]:
    """Every accepted spelling (canonical names and the seed's aliases) -> canonical name."""
    spellings = {}
    for canonical, cls in LOSS_CLASSES.items():
        for spelling in (canonical, *cls.aliases):
            spellings[spelling] = canonical
    return spellings


_BY_KEY: dict[str, str] = {_normalize(s): c for s, c in _spellings().items()}


def resolve_loss_name(name: str) -> str:
    """The canonical name of a loss given by any accepted spelling (case-insensitive)."""
    if isinstance(name, str) and _normalize(name) in _BY_KEY:
        return _BY_KEY[_normalize(name)]
    spellings = _spellings()
    by_key = {_normalize(s): s for s in spellings}
    close = difflib.get_close_matches(
        _normalize(str(name)), list(by_key), n=3, cutoff=0.6
    )
    hint = f" (did you mean {', '.join(repr(by_key[k]) for k in close)}?)" if close else ""
    raise UserError(
        f"[loss] unknown loss name {name!r}{hint}; known losses: {', '.join(LOSS_CLASSES)}"
    )


def loss_param_defaults(name: str) -> dict[str, object]:
    """The parameters a loss accepts, with their defaults, in declaration order (P-ASL also takes
    its class `prior`, given at run time)."""
    cls = LOSS_CLASSES[resolve_loss_name(name)]
    defaults: dict[str, object] = {key: info.default for key, info in cls.Params.model_fields.items()}
    if cls is PartialSelectiveLoss:
        defaults["prior"] = None
    return defaults


def loss_param_fields() -> dict[str, object]:
    """Every loss parameter name → its field (type, range, description), over all losses: what the
    recipe's [loss] section accepts. A name shared by several losses has one range in all of them."""
    fields: dict[str, object] = {}
    for cls in LOSS_CLASSES.values():
        for key, info in cls.Params.model_fields.items():
            fields.setdefault(key, info)
    return fields


def per_image_loss(loss_fn: nn.Module, logits: Tensor, targets, chunk: int, device: torch.device) -> float:
    """A loss over many images as reported: the mean over chunks of `chunk` images (one micro-batch
    of the whole run, so independent of the process count), sum-reduced losses divided by the
    chunk's image count, so that every loss is per image."""
    targets = torch.as_tensor(targets, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(logits), chunk):
            part = logits[i:i + chunk].to(device)
            value = loss_fn(part, targets[i:i + chunk].to(device)).item()
            total += value / len(part) if loss_fn.reduction == "sum" else value
            count += 1
    return total / max(count, 1)


def build_loss(name: str, **params: object) -> nn.Module:
    """The loss module ``name`` (any accepted spelling); params set to None take the default."""
    canonical = resolve_loss_name(name)
    accepted = loss_param_defaults(canonical)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        close = {
            k: difflib.get_close_matches(k, list(accepted), n=1, cutoff=0.75) for k in unknown
        }
        hints = "".join(f"; did you mean {c[0]}?" for c in close.values() if c)
        verb = "does" if len(unknown) == 1 else "do"
        raise UserError(
            f"[loss] {', '.join(unknown)} {verb} not apply to loss '{canonical}' "
            f"(it accepts: {', '.join(accepted) or 'none'}){hints}"
        )
    return LOSS_CLASSES[canonical](**given)
