"""`aicoss ensemble`: the weighted mean of the members' sigmoid outputs on the test set, every
member's and the ensemble's val mAP on their shared val split, and the member weights (equal, the
spec's, or fit on val with a held-out check of the gain). Members that are cross-validation folders
are scored, weighed and thresholded on their out-of-fold predictions instead (every training image),
the held-out check on whole folds.

Where members come from and what they must share is `members`'s; the one forward loop runs them
all on each decoded batch (`forward`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import check_outputs
from aicoss_cli.base.runtime import make_runtime
from aicoss_cli.data.submission import write_scores_csv
from aicoss_cli.data.tables import data_inputs, read_test
from aicoss_cli.evaluation.halves import halves
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
from aicoss_cli.infer.forward import MemberSource, combine, forward, load_members, member_meta, require_finite
from aicoss_cli.infer.members import Discovery, check_members, cv_members, discover_runs, read_spec, val_split
from aicoss_cli.results.ensembles import EnsembleMember, EnsembleResult, result_path_for, write_ensemble_result

# --------------------------------------------------------------------------- weights


def fit_weights(probs: np.ndarray, targets: np.ndarray, rounds: int | None = None) -> np.ndarray:
    """Non-negative member weights that sum to 1, by greedy forward selection with replacement
    (Caruana et al., "Ensemble selection from libraries of models", 2004).

    Start from an empty ensemble; each round adds the member (repeats allowed) whose addition gives
    the highest macro mAP of the running mean; weight_m = (times m was added) / (additions), taken
    at the round with the best mAP. Weights are multiples of 1/rounds; a member never chosen gets 0."""
    m = len(probs)
    if m == 1:
        return np.ones(1)
    rounds = rounds or max(20, 5 * m)
    counts = np.zeros(m)
    total = np.zeros(probs.shape[1:], dtype=np.float64)
    best_score, best_counts = -np.inf, None
    for _ in range(rounds):
        # AP only depends on the ranking, so the running sum scores like the running mean
        scores = [mean_average_precision(targets, total + probs[k]) for k in range(m)]
        if np.isnan(scores).all():
            break  # no class with a positive: nothing to fit on
        k = int(np.nanargmax(scores))
        counts[k] += 1
        total += probs[k]
        if scores[k] > best_score + 1e-12:
            best_score, best_counts = scores[k], counts.copy()
    if best_counts is None:  # every score NaN: no class with a positive to fit on
        return np.full(m, 1.0 / m)
    return best_counts / best_counts.sum()


@dataclass
class HeldOut:
    """Auto weights fit on half A of val and scored on half B, against equal weights on B."""

    n_fit: int
    n_score: int
    weights_fit: list[float]
    equal_map: float
    auto_map: float

    @property
    def gain(self) -> float:
        return self.auto_map - self.equal_map


def auto_weights_problem(targets: np.ndarray, seed: int = 0, rows: tuple[np.ndarray, np.ndarray] | None = None
                         ) -> str | None:
    """Why --weights auto cannot work on these val labels (None when it can): fitting and the
    held-out check need a class with a positive in each half of the split (`rows`: the halves)."""
    fit, score = rows if rows is not None else halves(len(targets), seed)
    for part, what in ((fit, "the half it fits on"), (score, "the half it is scored on")):
        if not (targets[part] == 1).any():
            return (f"the val split has {len(targets)} images, and {what} has no positive label: "
                    "nothing to fit weights on")
    return None


def weaker_than_best(weighting: str, val_map: float | None, members: Sequence[MemberReport]) -> str | None:
    """A note when an ensemble with weights nobody fit scores below its best member on val."""
    scored = [m for m in members if m.val_map is not None and np.isfinite(m.val_map)]
    if weighting == "auto" or len(members) < 2 or val_map is None or not np.isfinite(val_map) or not scored:
        return None
    best = max(scored, key=lambda m: m.val_map)
    if val_map >= best.val_map:
        return None
    return (f"the ensemble ({weighting} weights) scores val mAP {val_map:.4f}, below its best member "
            f"{best.path} ({best.val_map:.4f}): try --weights auto, or leave the weaker members out")


def held_out_gain(probs: np.ndarray, targets: np.ndarray, seed: int = 0,
                  rows: tuple[np.ndarray, np.ndarray] | None = None) -> HeldOut:
    """Fit on a seeded random half of the val images (or the fit rows of `rows`), score on the other."""
    fit, score = rows if rows is not None else halves(probs.shape[1], seed)
    w = fit_weights(probs[:, fit], targets[fit])
    equal = mean_average_precision(targets[score], probs[:, score].mean(axis=0))
    auto = mean_average_precision(targets[score], np.tensordot(w, probs[:, score], axes=1))
    return HeldOut(len(fit), len(score), [float(v) for v in w], equal, auto)


# --------------------------------------------------------------------------- ensemble


@dataclass
class MemberReport:
    path: str
    arch: str
    img_size: int
    tta: str
    weight: float
    val_map: float | None
    stored_val_map: float | None
    img_per_s: float | None = None  # test images / this member's own forward time in the shared loop


def cv_report(source: MemberSource, cv, meta, tta: str) -> MemberReport:
    """A CV folder as one member: the arch and input size of its first fold's checkpoint (`meta`), and
    the mean of its folds' val mAPs as its score at training; its val mAP, from its out-of-fold
    predictions, is set with the others'."""
    return MemberReport(str(source.path), meta.arch, meta.img_size, source.tta or tta, 0.0, None,
                        float(np.mean(cv.fold_maps)))


@dataclass
class EnsembleRun:
    """What `run_ensemble` did: the members as run, the scores, the files written, the notes.
    `record()` is what it stores in the result file (`results.ensembles.EnsembleResult`)."""

    members: list[MemberReport]
    out: Path
    n_test: int
    n_val: int
    runtime: str
    weighting: str
    seconds: float
    val_map: float | None = None
    equal_val_map: float | None = None
    held_out: HeldOut | None = None
    discovery: Discovery | None = None
    notes: list[str] = field(default_factory=list)
    result_path: Path | None = None
    img_per_s: float = 0.0
    device: str = ""
    precision: str = "fp32"
    per_class: list[dict] = field(default_factory=list)  # of the ensemble on the val split
    per_class_path: Path | None = None
    thresholds: Thresholds | None = None  # with --labels
    labels_path: Path | None = None
    thresholds_path: Path | None = None
    out_of_fold: bool = False  # the members are CV folders: "val" is their out-of-fold predictions

    def record(self) -> EnsembleResult:
        """The result file's content (`<out stem>.json`, read by `aicoss report --ensemble`)."""
        return EnsembleResult(
            submission=str(self.out),
            members=[EnsembleMember(m.path, m.arch, m.img_size, m.weight, m.val_map, img_per_s=m.img_per_s)
                     for m in self.members],
            val_map=self.val_map, equal_val_map=self.equal_val_map, weighting=self.weighting, n_val=self.n_val,
            n_test=self.n_test, img_per_s=self.img_per_s, seconds=self.seconds, device=self.device,
            precision=self.precision, per_class=self.per_class or None,
            per_class_csv=None if self.per_class_path is None else str(self.per_class_path),
            labels=None if self.thresholds is None else self.thresholds.to_json(self.labels_path,
                                                                                self.thresholds_path))

    def to_json(self) -> dict:
        return self.record().to_json()


def run_ensemble(checkpoints: Sequence[Path] = (), *, spec: Path | None = None, fp16: bool = False,
                 weights: str | None = None, data: Path | None = None, out: Path | None = None,
                 runs_dir: Path = Path("runs"), tta: str = "none", batch_size: int = 64,
                 num_workers: int | None = None, device: str = "auto", labels: str | None = None,
                 overwrite: bool = False, progress=None) -> EnsembleRun:
    """Weighted mean of the members' sigmoid outputs on the test set; every member's and the
    ensemble's val mAP on their shared val split, and the ensemble's per-class AP / F1 there; with
    `labels` (a threshold, a class,threshold CSV or "auto") also the 0/1 labels of the test set."""
    if weights not in (None, "equal", "auto"):
        raise UserError(f"--weights must be equal or auto (got {weights!r})")
    spec_labels = parse_threshold_spec(labels) if labels is not None else None
    sources: list[MemberSource] = []
    spec_data = None
    if spec is not None:
        sources, spec_data = read_spec(spec)
    sources += [MemberSource(Path(p)) for p in checkpoints]
    discovery = None
    if not sources:
        discovery = discover_runs(runs_dir, data)
        sources = [MemberSource(p) for p in discovery.taken]
        data = discovery.data_root
    cv = cv_members(sources, Path(data) if data is not None else spec_data)
    checkpoints = cv.checkpoints if cv is not None else sources
    metas = [(str(s.path), member_meta(s.path)) for s in checkpoints]
    shared = check_members(metas, same_split=cv is None)
    ref_src, ref = metas[0]
    root = Path(data) if data is not None else spec_data if spec_data is not None else \
        cv.cvs[0].root if cv is not None else ref.resolve_data_root(None, ref_src)
    test = read_test(root, ref.classes)
    has_split = cv is not None or (shared and bool(ref.split.get("val_fingerprint")))
    notes: list[str] = []
    val_paths: list[str] = []
    targets, rows = None, None
    if cv is not None:
        targets, rows = cv.targets, cv.halves()
        notes.append(f"the members are cross-validation folders: val mAP, --weights auto and --labels auto use their "
                     f"out-of-fold predictions on all {len(targets)} training images; the held-out check fits on "
                     "half of the folds and scores on the others")
    elif has_split:
        val = val_split(ref, root, ref_src)
        val_paths, targets = val.paths, val.targets
    elif not shared:
        notes.append("the members are folds of one cross-validation, each validated on another fold: no shared val "
                     "split, so no val mAP; equal or spec weights only")
        for option, value in (("--weights", weights), ("--labels", spec_labels)):
            if value == "auto":
                raise UserError(f"{option} auto: these members are folds of one cross-validation and share no val "
                                "split; pass its folder (runs/<name>/<timestamp>-cvK) to fit on its out-of-fold "
                                "predictions")
    else:
        notes.append("the members have no val split in their metadata: no val mAP, equal or spec weights only")
        if weights == "auto":
            raise UserError(f"{ref_src}: --weights auto fits on the val split, and these members record none")
        if spec_labels == "auto":
            raise UserError(f"{ref_src}: --labels auto fits on the val split, and these members record none")
    out = Path(out) if out is not None else Path("ensemble_submission.csv")
    inputs = [s.path for s in checkpoints] + ([Path(spec)] if spec else []) + data_inputs(root) + (
        [spec_labels] if isinstance(spec_labels, Path) else [])
    outputs = [out, result_path_for(out), *([per_class_path_for(out)] if has_split else []),
               *(label_output_paths(out) if spec_labels is not None else [])]
    check_outputs(outputs, inputs, overwrite)
    if isinstance(spec_labels, Path):
        read_thresholds_csv(spec_labels, ref.classes)  # a bad thresholds file fails before any compute
    if weights == "auto" and len(sources) > 1 and (problem := auto_weights_problem(targets, rows=rows)):
        notes.append(f"--weights auto falls back to equal weights: {problem}")
        weights = "equal"

    rt = make_runtime(device, "fp16" if fp16 else "fp32", num_workers)
    notes = rt.notes + notes
    t0 = time.perf_counter()
    members = load_members(checkpoints, rt, default_tta=tta, progress=progress)
    spec_weights = [1.0 if s.weight is None else float(s.weight) for s in sources]
    weighting = "equal"
    final = np.full(len(sources), 1.0 / len(sources))
    if weights is None and any(s.weight is not None for s in sources):
        weighting, final = "spec", np.asarray(spec_weights) / sum(spec_weights)
    reports = [MemberReport(m.path, m.meta.arch, m.img_size, m.tta, 0.0, None, m.meta.val_map) for m in members] \
        if cv is None else [cv_report(s, c, metas[p * c.folds][1], tta) for p, (s, c) in enumerate(zip(sources, cv.cvs))]
    result = EnsembleRun(reports, out, len(test), len(targets) if cv is not None else len(val_paths), rt.describe(),
                         weighting, 0.0, notes=notes, discovery=discovery, out_of_fold=cv is not None)
    if has_split:
        if cv is not None:
            val_probs = cv.oof
        else:
            val_out = forward(members, val_paths, rt, batch_size, progress=progress,
                              what=f"val: {len(val_paths)} images × {len(members)} members")
            require_finite(val_out, members, val_paths)
            val_probs = val_out.numpy()
        for report, p in zip(reports, val_probs):
            report.val_map = mean_average_precision(targets, p)
        result.equal_val_map = mean_average_precision(targets, val_probs.mean(axis=0))
        if weights == "auto" and len(reports) > 1:
            result.held_out = held_out_gain(val_probs, targets, rows=rows)
            final = fit_weights(val_probs, targets)
            weighting = "auto"
            if result.held_out.gain < 0:
                noise = "these out-of-fold predictions" if cv is not None else "this val split"
                notes.append(f"auto weights score {-result.held_out.gain:.4f} mAP below equal weights on the "
                             f"held-out half: they fit noise of {noise}; prefer --weights equal here")
        elif weights == "auto":
            notes.append("one member: --weights auto has nothing to weigh")
        combined_val = np.tensordot(final, val_probs, axes=1)
        result.val_map = mean_average_precision(targets, combined_val)
        weaker = weaker_than_best(weighting, result.val_map, reports)
        if weaker:
            notes.append(weaker)
    if spec_labels is not None:
        result.thresholds = resolve_thresholds(spec_labels, ref.classes, targets, combined_val if has_split else None,
                                               rows=rows, what="out-of-fold" if cv is not None else "val")
    result.weighting = weighting
    for report, w in zip(reports, final):
        report.weight = float(w)
    t_test = time.perf_counter()
    member_seconds = [0.0] * len(members)
    test_probs = forward(members, test.paths, rt, batch_size, progress=progress,
                         what=f"test: {len(test)} images × {len(members)} members", member_seconds=member_seconds)
    result.img_per_s = len(test) / max(time.perf_counter() - t_test, 1e-9)
    if cv is not None:  # a CV folder's seconds are those of its folds
        member_seconds = [sum(part) for part in np.split(np.asarray(member_seconds), len(reports))]
    for report, seconds in zip(reports, member_seconds):
        report.img_per_s = len(test) / max(seconds, 1e-9)
    require_finite(test_probs, members, test.paths)  # before any file is written
    combined = combine(test_probs, cv.per_checkpoint(final) if cv is not None else final)
    if has_split:
        threshold = result.thresholds if result.thresholds is not None else DEFAULT_THRESHOLD
        result.per_class = per_class_rows(ref.classes, targets, combined_val, threshold)
        result.per_class_path = per_class_path_for(out)
        write_per_class_csv(result.per_class_path, result.per_class)
    write_scores_csv(out, test.ids, test.classes, combined)
    if result.thresholds is not None:
        result.labels_path, result.thresholds_path = write_label_outputs(out, test.ids, test.classes,
                                                                         combined.numpy(), result.thresholds)
    result.seconds = time.perf_counter() - t0
    result.device, result.precision = rt.describe().split(", ")[0], rt.precision
    result.result_path = write_ensemble_result(result_path_for(out), result.record())
    return result
