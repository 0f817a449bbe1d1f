"""The parameters of each loss: one pydantic model per loss, the one place a parameter, its default
and its range are declared (the recipe's [loss] section is built from these models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aicoss_cli.base.errors import UserError


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
