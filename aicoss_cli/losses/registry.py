"""The losses by name: `build_loss(name, **params)`, the accepted spellings (the seed's class names
among them), each loss's parameters and defaults, and the per-image loss the run reports.
"""

from __future__ import annotations

import difflib

import torch
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError
from aicoss_cli.losses.modules import AsymmetricLoss, BCELogitLoss, PartialSelectiveLoss, TwoWayLoss, ZLPRLoss, _Loss

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
