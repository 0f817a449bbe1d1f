"""The seed's multi-label losses as pure functions, each docstring giving its formula.

``logits`` and ``targets`` have shape (N, K); a target is 1 (positive), 0 (negative) or
-1 (not annotated). Every loss computes in float32 (float64 when given float64 logits, for
gradcheck) with autocast switched off, from ``logsigmoid`` / ``logsumexp``, so fp16 and bf16
training give the fp32 value and never NaN, even at logits of +-100.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.params import AsymmetricParams, PartialSelectiveParams, TwoWayParams


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
