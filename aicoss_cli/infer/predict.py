"""`aicoss predict`: one checkpoint, the images it is asked about, the CSVs.

A checkpoint carries what predicting needs (arch, input size, classes, data root, split), so
`run_predict` rebuilds the model and its val split from it alone, checks every output path before
any compute, runs the one forward loop (`forward.forward`) and writes the results atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import check_outputs
from aicoss_cli.base.runtime import make_runtime
from aicoss_cli.data.submission import write_scores_csv
from aicoss_cli.data.tables import data_inputs, read_test
from aicoss_cli.evaluation.metrics import mean_average_precision
from aicoss_cli.evaluation.score import per_class_path_for, per_class_rows, write_per_class_csv
from aicoss_cli.evaluation.thresholds import (
    DEFAULT_THRESHOLD,
    Thresholds,
    label_output_paths,
    parse_threshold_spec,
    read_thresholds_csv,
    resolve_thresholds,
    write_label_outputs,
)
from aicoss_cli.infer.forward import TTA_MODES, MemberSource, forward, load_members, member_meta, require_finite
from aicoss_cli.infer.members import other_data, val_split


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
    per_class: list[dict] = field(default_factory=list)  # thresholds.per_class_rows, with --split val
    per_class_path: Path | None = None
    thresholds: Thresholds | None = None  # with --labels
    labels_path: Path | None = None
    thresholds_path: Path | None = None

    @property
    def img_per_s(self) -> float | None:
        return self.n_images / self.loop_seconds if self.loop_seconds > 0 else None

    def to_json(self) -> dict:
        """What `--json` prints: the files written, the run, and the scores (NaN as null)."""
        return json_ready({
            "checkpoint": str(self.checkpoint), "out": str(self.out), "split": self.split, "n_images": self.n_images,
            "classes": self.classes, "runtime": self.runtime, "tta": self.tta, "seconds": self.seconds,
            "img_per_s": self.img_per_s, "val_map": self.val_map, "per_class": self.per_class or None,
            "per_class_csv": None if self.per_class_path is None else str(self.per_class_path),
            "labels": None if self.thresholds is None else self.thresholds.to_json(self.labels_path, self.thresholds_path), "notes": self.notes,
        })


def default_predict_out(checkpoint: Path, split: str) -> Path:
    return Path(checkpoint).parent / f"predictions_{Path(checkpoint).stem}_{split}.csv"


def validation_batch(meta) -> int:
    """The batch size the checkpoint's run validated and predicted its test set with (`[runtime]
    eval_batch_size`, else `[optim] batch_size` / `grad_accumulation` on one process; 64 when the
    stored recipe does not say). The same batches give the same bits: another batch composition
    can round a float32 output differently in its last digit."""
    import tomllib

    try:
        recipe = tomllib.loads(meta.recipe_toml) if meta.recipe_toml else {}
    except tomllib.TOMLDecodeError:
        recipe = {}
    runtime, optim = recipe.get("runtime", {}), recipe.get("optim", {})
    value = runtime.get("eval_batch_size")
    if value is None and isinstance(optim.get("batch_size"), int):
        accumulation = optim.get("grad_accumulation", 1)
        value = optim["batch_size"] // accumulation if isinstance(accumulation, int) and accumulation >= 1 else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096 else 64


def run_predict(checkpoint: Path, *, data: Path | None = None, split: str = "test", out: Path | None = None,
                precision: str = "fp32", tta: str = "none", batch_size: int | None = None, num_workers: int | None = None,
                device: str = "auto", labels: str | None = None, overwrite: bool = False,
                progress=None) -> PredictResult:
    """One checkpoint → probabilities of the test set (in sample_submission.csv's row order) or of its
    own val split (with val mAP and per-class AP, F1, precision, recall); with `labels` (a threshold,
    a class,threshold CSV or "auto": F1-optimal per class on the val split) also the 0/1 labels.
    `batch_size` None: the checkpoint's own (`validation_batch`), so predict reproduces its run's
    val_scores.csv and submission.csv byte for byte."""
    if split not in ("test", "val"):
        raise UserError(f"--split must be test or val (got {split!r})")
    if tta not in TTA_MODES:
        raise UserError(f"--tta must be one of {', '.join(TTA_MODES)} (got {tta!r})")
    spec = parse_threshold_spec(labels) if labels is not None else None
    checkpoint = Path(checkpoint)
    meta = member_meta(checkpoint)
    root = meta.resolve_data_root(data, str(checkpoint))
    val = val_split(meta, root, str(checkpoint)) if split == "val" or spec == "auto" else None
    val_paths, val_targets = (val.paths, val.targets) if val is not None else (None, None)
    notes = []
    if split == "test":
        test = read_test(root, meta.classes)
        ids, paths = test.ids, test.paths
        mismatch = other_data(meta, root, str(checkpoint))
        if mismatch:
            notes.append(mismatch)
    else:
        ids, paths = val.ids, val.paths
    out = Path(out) if out is not None else default_predict_out(checkpoint, split)
    per_class_path = per_class_path_for(out) if split == "val" else None
    label_paths = label_output_paths(out) if spec is not None else (None, None)
    outputs = [out, *(p for p in (per_class_path, *label_paths) if p is not None)]
    check_outputs(outputs, [checkpoint, *data_inputs(root), *([spec] if isinstance(spec, Path) else [])], overwrite)
    if isinstance(spec, Path):
        read_thresholds_csv(spec, meta.classes)  # a bad thresholds file fails before any compute

    batch_size = batch_size or validation_batch(meta)
    rt = make_runtime(device, precision, num_workers)
    t0 = time.perf_counter()
    members = load_members([MemberSource(checkpoint, 1.0, tta)], rt, progress=progress)
    t1 = time.perf_counter()
    probs = forward(members, paths, rt, batch_size, progress=progress, what=f"predicting {len(paths)} {split} images")
    require_finite(probs, members, paths)
    probs = probs[0]
    result = PredictResult(checkpoint, out, split, len(paths), meta.classes, rt.describe(), tta, 0.0,
                           time.perf_counter() - t1, rt.notes + notes)
    val_probs = probs.numpy() if split == "val" else None
    if spec == "auto" and val_probs is None:
        val_out = forward(members, val_paths, rt, batch_size, progress=progress,
                          what=f"predicting {len(val_paths)} val images (for --labels auto)")
        require_finite(val_out, members, val_paths)
        val_probs = val_out[0].numpy()
    if spec is not None:
        result.thresholds = resolve_thresholds(spec, meta.classes, val_targets, val_probs)
    if split == "val":
        threshold = result.thresholds if result.thresholds is not None else DEFAULT_THRESHOLD
        result.per_class = per_class_rows(meta.classes, val_targets, val_probs, threshold)
        result.val_map = mean_average_precision(val_targets, val_probs)
        write_per_class_csv(per_class_path, result.per_class)
        result.per_class_path = per_class_path
    write_scores_csv(out, ids, meta.classes, probs)
    if result.thresholds is not None:
        result.labels_path, result.thresholds_path = write_label_outputs(out, ids, meta.classes, probs.numpy(),
                                                                         result.thresholds)
    result.seconds = time.perf_counter() - t0
    return result
