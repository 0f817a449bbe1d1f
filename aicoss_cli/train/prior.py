"""The class prior of P-ASL: per-class positive frequency, read from and written to CSV, how it
evolves during a run (`PriorTracker`), and `aicoss prior` (a checkpoint's mean prediction over its
training split, the seed's "avg_pred").

The CSV has the seed's columns ``Classes,avg_pred`` (one row per class) and is matched to the
data's classes by name, never by row order.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path, check_outputs
from aicoss_cli.base.runtime import make_runtime
from aicoss_cli.data.images import check_images
from aicoss_cli.data.splits import training_rows
from aicoss_cli.data.tables import data_inputs, read_train
from aicoss_cli.infer.forward import MemberSource, forward, load_members, member_meta, require_finite

CLASS_COLUMN = "Classes"
VALUE_COLUMN = "avg_pred"


def _some(names: Sequence[str], limit: int = 5) -> str:
    """The first few names, quoted, and how many more there are."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_prior_csv(path: str | os.PathLike, classes: Sequence[str]) -> Tensor:
    """The prior in a ``Classes,avg_pred`` CSV as float32, one value per class in ``classes``
    order; the CSV must list exactly these classes, once each, with values in [0, 1]."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UserError(f"{path}: prior file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: cannot read the prior CSV ({err})") from None
    if not rows:
        raise UserError(f"{path}: the prior CSV is empty (expected columns Classes,avg_pred)")

    header = [h.strip() for h in rows[0]]
    missing_columns = [c for c in (CLASS_COLUMN, VALUE_COLUMN) if c not in header]
    if missing_columns:
        raise UserError(
            f"{path}: the prior CSV has no column {' or '.join(missing_columns)} "
            f"(expected columns Classes,avg_pred; got {','.join(header)})"
        )
    name_at, value_at = header.index(CLASS_COLUMN), header.index(VALUE_COLUMN)

    values: dict[str, float] = {}
    duplicated: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(name_at, value_at):
            raise UserError(f"{path}: line {line} has {len(row)} fields, expected {len(header)}")
        name = row[name_at] if row[name_at] in classes else row[name_at].strip()  # as written, or trimmed
        text = row[value_at].strip()
        try:
            value = float(text)
        except ValueError:
            raise UserError(
                f"{path}: line {line}: avg_pred of class {name!r} is not a number ({text!r})"
            ) from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise UserError(
                f"{path}: line {line}: avg_pred of class {name!r} must lie in [0, 1] "
                f"(got {text})"
            )
        if name in values:
            duplicated.append(name)
        values[name] = value

    if duplicated:
        raise UserError(f"{path}: class listed more than once: {_some(duplicated)}")
    missing = [c for c in classes if c not in values]
    extra = [c for c in values if c not in set(classes)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing class(es) {_some(missing)}")
        if extra:
            parts.append(f"class(es) not in the data {_some(extra)}")
        raise UserError(
            f"{path}: the prior does not match the data's {len(classes)} classes: "
            + "; ".join(parts)
        )
    return torch.tensor([values[c] for c in classes], dtype=torch.float32)


def write_prior_csv(
    path: str | os.PathLike, classes: Sequence[str], values: Sequence[float] | Tensor
) -> None:
    """Write ``Classes,avg_pred`` atomically (`base.files.atomic_path`)."""
    path = Path(path)
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()
    if len(values) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(values)} prior values")
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([CLASS_COLUMN, VALUE_COLUMN])
        writer.writerows([name, repr(float(v))] for name, v in zip(classes, values))


def label_prior(targets: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """Positive frequency of each class over its annotated entries:

        prior_j = #{i: y_ij = 1} / #{i: y_ij != -1}   (0 when the class has no annotated entry)
    """
    y = torch.as_tensor(targets)
    if y.dim() != 2:
        raise ValueError(f"targets must have shape (N, K), got {tuple(y.shape)}")
    positives = (y == 1).sum(dim=0).double()
    annotated = (y != -1).sum(dim=0).double()
    return (positives / annotated.clamp(min=1)).float()


def prior_has_effect(
    loss_name: str, params: Mapping[str, object], targets: Tensor | Sequence[Sequence[float]]
) -> str | None:
    """None when a prior changes the loss; otherwise a sentence saying why it changes nothing."""
    from aicoss_cli.losses.registry import loss_param_defaults, resolve_loss_name

    canonical = resolve_loss_name(loss_name)
    if canonical != "partial_selective":
        return (
            f"the class prior changes nothing: loss '{canonical}' does not use it "
            "(only partial_selective does)"
        )
    settings = {**loss_param_defaults(canonical),
                **{k: v for k, v in params.items() if v is not None}}
    mode = str(settings["partial_mode"]).lower()
    if mode != "selective":
        return (
            f"the class prior changes nothing: partial_mode is '{mode}', and the prior is only "
            "used when partial_mode = 'selective'"
        )
    if float(settings["prior_threshold"]) >= 1:
        return (
            "the class prior changes nothing: prior_threshold is 1, and no class prior "
            "can exceed it"
        )
    if not bool((torch.as_tensor(targets) == -1).any()):
        return (
            "the class prior changes nothing: the training labels have no -1 (not annotated) "
            "entry, and the prior only decides which unannotated entries are ignored"
        )
    return None


class PriorTracker:
    """The class prior a P-ASL loss uses during training, and how it evolves.

    - "labels" / a CSV: fixed for the whole run;
    - "predictions" (the seed's `ComputePrior`): none in the first epoch, then the previous epoch's
      mean sigmoid output over its training images. The sums stay on the device during the epoch
      (`observe` adds to them without a host sync) and are reduced over processes at its end.
    """

    def __init__(self, mode: str, prior: Tensor | None, num_classes: int, device: torch.device):
        self.mode, self.prior, self.device = mode, prior, device
        self.sums = torch.zeros(num_classes + 1, dtype=torch.float64, device=device) if mode == "predictions" else None

    @classmethod
    def from_recipe(cls, source: bool | str, loss_name: str, loss_params: Mapping[str, object],
                    classes: Sequence[str], train_labels, device: torch.device,
                    notes: list[str]) -> PriorTracker | None:
        """The tracker for `[loss] prior` (None when the recipe has none); a note when it changes nothing."""
        if source is False:
            return None
        why = prior_has_effect(loss_name, loss_params, train_labels)
        if why:
            notes.append(f"[loss] prior = {source!r} changes nothing here: {why}")
        if source == "labels":
            return cls("labels", label_prior(torch.as_tensor(train_labels)), len(classes), device)
        if source == "predictions":
            return cls("predictions", None, len(classes), device)
        return cls("file", read_prior_csv(source, classes), len(classes), device)

    def apply(self, loss_fn) -> None:
        if self.prior is not None and hasattr(loss_fn, "set_prior"):
            loss_fn.set_prior(self.prior.to(self.device))

    def observe(self, logits: Tensor) -> None:
        """Add a training batch's sigmoid outputs (predictions mode only; no host sync)."""
        if self.sums is not None:
            self.sums[:-1] += torch.sigmoid(logits.detach().float()).sum(0).double()
            self.sums[-1] += logits.shape[0]

    def snapshot(self) -> Tensor | None:
        return None if self.sums is None else self.sums.clone()

    def restore(self, saved: Tensor | Sequence[float] | None) -> None:
        """Back to a snapshot or to sums stored in the training state (none: an empty epoch)."""
        if self.sums is not None:
            if saved is None:
                self.sums.zero_()
            else:
                self.sums.copy_(torch.as_tensor(saved, dtype=torch.float64))

    def end_epoch(self, reduce, loss_fn) -> None:
        """Predictions mode: the epoch's mean prediction (summed over processes by `reduce`) becomes
        the prior of the next epoch."""
        if self.sums is None:
            return
        sums = reduce(self.sums).cpu()
        self.prior = (sums[:-1] / max(float(sums[-1]), 1.0)).float()
        self.apply(loss_fn)
        self.sums.zero_()


@dataclass
class PriorResult:
    out: Path
    classes: list[str]
    values: list[float]
    n_images: int


def run_prior(checkpoint: Path, *, data: Path | None = None, out: Path = Path("prior.csv"), batch_size: int = 64,
              device: str = "auto", overwrite: bool = False, progress=None) -> PriorResult:
    """The seed's "avg_pred": the mean sigmoid output of a checkpoint over its training split,
    written as a `Classes,avg_pred` CSV (the class prior of P-ASL)."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = member_meta(checkpoint)
    root = meta.resolve_data_root(data, str(checkpoint))
    check_outputs([out], [checkpoint, *data_inputs(root)], overwrite)
    table = read_train(root)
    meta.check_classes(table.classes, str(checkpoint), Path(root) / "train.csv")
    rows = training_rows(meta.split, table, str(checkpoint))
    paths = [table.paths[i] for i in rows]
    check_images(paths, Path(root) / "train.csv")
    rt = make_runtime(device, "fp32", 0)
    members = load_members([MemberSource(checkpoint)], rt)
    probs = forward(members, paths, rt, batch_size, progress=progress, what="predicting the training split")
    require_finite(probs, members, paths)
    probs = probs[0]
    values = probs.double().mean(dim=0).tolist() if len(paths) else [0.0] * len(meta.classes)
    write_prior_csv(out, meta.classes, values)
    return PriorResult(out, meta.classes, values, len(paths))
