"""`aicoss predict` and `aicoss prior`: one checkpoint, the images it is asked about, the CSVs.

A checkpoint carries what predicting needs (arch, input size, classes, data root, split), so
`run_predict` rebuilds the model and its val split from it alone, checks every output path before
any compute, runs the one forward loop (`inference.forward`) and writes the results atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from aicoss_cli.checkpoint import check_output, read_meta
from aicoss_cli.data import data_inputs, read_test, read_train, split_from_record, split_indices
from aicoss_cli.errors import UserError
from aicoss_cli.inference import TTA_MODES, MemberSource, forward, load_members, write_scores_csv
from aicoss_cli.metrics import average_precision_per_class, mean_average_precision
from aicoss_cli.runtime import make_runtime

@dataclass
class PredictResult:
    checkpoint: Path
    out: Path
    split: str
    n_images: int
    classes: list[str]
    runtime: str
    tta: str
    seconds: float
    loop_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    val_map: float | None = None
    per_class: list[dict] = field(default_factory=list)
    per_class_path: Path | None = None


def default_predict_out(checkpoint: Path, split: str) -> Path:
    return Path(checkpoint).parent / f"predictions_{Path(checkpoint).stem}_{split}.csv"


def run_predict(checkpoint: Path, *, data: Path | None = None, split: str = "test", out: Path | None = None,
                precision: str = "fp32", tta: str = "none", batch_size: int = 64, num_workers: int | None = None,
                device: str = "auto", progress=None) -> PredictResult:
    """One checkpoint → probabilities of the test set (in sample_submission.csv's row order) or of its
    own val split (with val mAP and per-class AP)."""
    if split not in ("test", "val"):
        raise UserError(f"--split must be test or val (got {split!r})")
    if tta not in TTA_MODES:
        raise UserError(f"--tta must be one of {', '.join(TTA_MODES)} (got {tta!r})")
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    root = meta.resolve_data_root(data, str(checkpoint))
    targets = None
    if split == "test":
        test = read_test(root, meta.classes)
        ids, paths = test.ids, test.paths
    else:
        table = read_train(root)
        meta.check_classes(table.classes, str(checkpoint), root / "train.csv")
        _, rows = split_from_record(meta.split, table, str(checkpoint))
        ids, paths, targets = [table.ids[i] for i in rows], [table.paths[i] for i in rows], table.labels[rows]
    out = Path(out) if out is not None else default_predict_out(checkpoint, split)
    per_class_path = out.parent / "per_class_ap.csv" if split == "val" else None
    inputs = [checkpoint, *data_inputs(root)]
    check_output(out, inputs)
    if per_class_path is not None:
        if per_class_path.resolve() == out.resolve():
            raise UserError(f"{out}: per_class_ap.csv is written beside --out; give --out another name")
        check_output(per_class_path, inputs)

    rt = make_runtime(device, precision, num_workers)
    t0 = time.perf_counter()
    members = load_members([MemberSource(checkpoint, 1.0, tta)], rt, progress=progress)
    t1 = time.perf_counter()
    probs = forward(members, paths, rt, batch_size, progress=progress, what=f"predicting {len(paths)} {split} images")[0]
    result = PredictResult(checkpoint, out, split, len(paths), meta.classes, rt.describe(), tta, 0.0,
                           time.perf_counter() - t1, rt.notes)
    if targets is not None:
        result.per_class, result.val_map = per_class_table(meta.classes, targets, probs.numpy())
        write_per_class(per_class_path, result.per_class)
        result.per_class_path = per_class_path
    write_scores_csv(out, ids, meta.classes, probs)
    result.seconds = time.perf_counter() - t0
    return result


def per_class_table(classes: Sequence[str], targets: np.ndarray, scores: np.ndarray) -> tuple[list[dict], float]:
    """Per-class AP rows (class, positives, ap, rank: 1 = weakest) and the macro mAP."""
    aps = average_precision_per_class(targets, scores)
    order = [int(i) for i in np.argsort(np.where(np.isnan(aps), np.inf, aps), kind="stable")]
    rank = {j: r + 1 for r, j in enumerate(order) if not np.isnan(aps[j])}
    rows = [{"class": c, "positives": int((targets[:, j] > 0).sum()), "ap": float(aps[j]), "rank": rank.get(j)}
            for j, c in enumerate(classes)]
    return rows, mean_average_precision(targets, scores)


def write_per_class(path: Path, rows: list[dict]) -> None:
    from aicoss_cli.checkpoint import write_text_atomic

    lines = ["class,positives,ap,rank"]
    for r in rows:
        ap = "" if np.isnan(r["ap"]) else f"{r['ap']:.6f}"
        name = f'"{r["class"]}"' if "," in r["class"] or '"' in r["class"] else r["class"]
        lines.append(f"{name},{r['positives']},{ap},{'' if r['rank'] is None else r['rank']}")
    try:
        write_text_atomic(path, "\n".join(lines) + "\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another --out") from None


# --------------------------------------------------------------------------- prior


@dataclass
class PriorResult:
    out: Path
    classes: list[str]
    values: list[float]
    n_images: int


def training_rows(meta, table, source: str) -> np.ndarray:
    """The rows a checkpoint trained on: its recorded split, verified when it has a fingerprint
    (an imported seed checkpoint without --data records only the seed's split settings)."""
    split = meta.split or {"kind": "random", "val_fraction": 0.1, "split_seed": 78}
    if split.get("val_fingerprint"):
        return split_from_record(split, table, source)[0]
    train, _ = split_indices(table.labels, split.get("kind", "random"), float(split.get("val_fraction", 0.1)),
                               int(split.get("split_seed", 78)))
    return train


def run_prior(checkpoint: Path, *, data: Path | None = None, out: Path = Path("prior.csv"), batch_size: int = 64,
              device: str = "auto", progress=None) -> PriorResult:
    """The seed's "avg_pred": the mean sigmoid output of a checkpoint over its training split,
    written as a `Classes,avg_pred` CSV (the class prior of P-ASL)."""
    from aicoss_cli.data import check_images
    from aicoss_cli.prior import write_prior_csv

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose another --out (nothing is overwritten)")
    meta = read_meta(checkpoint)
    root = meta.resolve_data_root(data, str(checkpoint))
    table = read_train(root)
    if table.classes != meta.classes:
        raise UserError(f"{root}/train.csv: its classes differ from the checkpoint's ({len(meta.classes)} classes)")
    rows = training_rows(meta, table, str(checkpoint))
    paths = [table.paths[i] for i in rows]
    check_images(paths, Path(root) / "train.csv")
    check_output(out, [checkpoint, *data_inputs(root)])
    rt = make_runtime(device, "fp32", 0)
    members = load_members([MemberSource(checkpoint)], rt)
    probs = forward(members, paths, rt, batch_size, progress=progress, what="predicting the training split")[0]
    values = probs.double().mean(dim=0).tolist() if len(paths) else [0.0] * len(meta.classes)
    write_prior_csv(out, meta.classes, values)
    return PriorResult(out, meta.classes, values, len(paths))

