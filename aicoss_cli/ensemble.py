"""Ensembles: the ENSEMBLE.toml spec, `runs/` discovery, member checks, member weights, and the
ensemble and benchmark-fp16 jobs.

Members must share the class list (names and order) and the validation split (the checkpoint's
`split` metadata, verified against train.csv with `splits.split_fingerprint`), so their val scores
can be compared and combined. The output is the weighted mean of the members' sigmoid outputs.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from aicoss_cli.checkpoint import CheckpointMeta, check_outputs, read_meta, write_text_atomic
from aicoss_cli.data import data_inputs, read_test, read_train
from aicoss_cli.splits import describe_split, split_from_record
from aicoss_cli.errors import UserError
from aicoss_cli.inference import MemberSource, combine, forward, load_members, member_meta, write_scores_csv
from aicoss_cli.keep import kept_file
from aicoss_cli.metrics import mean_average_precision
from aicoss_cli.recipe import read_toml
from aicoss_cli.runtime import half_dtype, make_runtime
from aicoss_cli.thresholds import (
    DEFAULT_THRESHOLD,
    Thresholds,
    json_ready,
    label_output_paths,
    parse_threshold_spec,
    per_class_path_for,
    per_class_rows,
    read_thresholds_csv,
    resolve_thresholds,
    write_label_outputs,
    write_per_class_csv,
)


# --------------------------------------------------------------------------- where members come from


def read_spec(path: Path) -> tuple[list[MemberSource], Path | None]:
    """Members (and the optional data root) of an ENSEMBLE.toml:

        data = "data/aicoss"            # optional
        [[member]]
        path = "runs/a/20240101T000000Z/best.safetensors"
        weight = 2.0                    # optional, default 1
        tta = "hflip"                   # optional: none | hflip | flips

    Relative paths are relative to the spec file's folder."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError  # the spec's schema, built on use

    class SpecMember(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        weight: float | None = Field(None, ge=0, allow_inf_nan=False)
        tta: Literal["none", "hflip", "flips"] | None = None

    class Spec(BaseModel):
        model_config = ConfigDict(extra="forbid")
        data: str | None = None
        member: list[SpecMember] = Field(min_length=1)

    path = Path(path)
    raw = read_toml(path, "ensemble spec not found")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = first["loc"]
        where = f"member {loc[1] + 1}: {'.'.join(map(str, loc[2:]))}" if loc[:1] == ("member",) and len(loc) > 2 \
            else ".".join(map(str, loc)) or "spec"
        what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise UserError(f"{path}: {where}: {what} (a spec has `data` and [[member]] tables with path, "
                        "weight, tta)") from None
    base = path.parent
    members = [MemberSource(base / m.path, m.weight, m.tta) for m in spec.member]
    if all(m.weight == 0 for m in members):
        raise UserError(f"{path}: every member has weight 0; give at least one a positive weight")
    total = sum(1.0 if m.weight is None else m.weight for m in members)
    if not math.isfinite(total):
        raise UserError(f"{path}: the member weights add up to more than a float holds ({total}); weights are "
                        "relative: scale them down (e.g. 1 and 2)")
    return members, (base / spec.data) if spec.data else None


@dataclass
class Discovery:
    """What `aicoss ensemble` with no member named took from the runs folder, and what it skipped."""

    taken: list[Path]
    skipped: list[tuple[Path, str]]
    data_root: Path


def discover_runs(runs_dir: Path, data: Path | None) -> Discovery:
    """The kept checkpoint (`[runtime] keep`) of every run folder runs_dir/<name>/<timestamp>/ whose classes and val split
    match the data. Runs validated on another split than the largest group are skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no runs folder; name the members (aicoss ensemble A.safetensors "
                        "B.safetensors), give --spec ENSEMBLE.toml, or point --runs at the folder `aicoss train` wrote")
    skipped: list[tuple[Path, str]] = []
    readable: list[tuple[Path, CheckpointMeta]] = []
    # run folders only (a tracker's folders can live under runs/ too)
    folders = (p for p in runs_dir.glob("*/*") if (p / "recipe.toml").is_file() or (p / "best.safetensors").is_file())
    for run in sorted(folders):
        ckpt = kept_file(run, run_keep(run))
        if not ckpt.is_file():
            skipped.append((run, f"no {ckpt.name} (no epoch finished)"))
            continue
        try:
            readable.append((ckpt, read_meta(ckpt)))
        except UserError as exc:
            skipped.append((ckpt, str(exc).removeprefix(f"{ckpt}: ")))
    if not readable:
        why = f" (skipped: {'; '.join(f'{p}: {r}' for p, r in skipped[:3])})" if skipped else ""
        raise UserError(f"{runs_dir}: no run with a readable kept checkpoint (best.safetensors, or last.safetensors where the recipe keeps the last){why}; train one with `aicoss train RECIPE`")
    if data is None:
        roots = sorted({str(m.data_root) for _, m in readable if m.data_root is not None})
        if len(roots) != 1:
            raise UserError(f"{runs_dir}: the runs were trained on {len(roots)} data roots "
                            f"({', '.join(roots[:3]) or 'none recorded'}); pass --data DIR")
        data = Path(roots[0])
    table = read_train(data)
    groups: dict[str, list[Path]] = {}
    for ckpt, meta in readable:
        if meta.classes != table.classes:
            skipped.append((ckpt, f"{meta.num_classes} classes that differ from the {len(table.classes)} of "
                                  f"{data / 'train.csv'}"))
            continue
        try:
            split_from_record(meta.split, table, str(ckpt))
        except UserError as exc:
            skipped.append((ckpt, str(exc).removeprefix(f"{ckpt}: ")))
            continue
        groups.setdefault(meta.split["val_fingerprint"], []).append(ckpt)
    if not groups:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise UserError(f"{runs_dir}: no run matches the data in {data} ({shown})")
    # the largest group of runs sharing a val split; on a tie, the one with the newest run
    best = max(groups.values(), key=lambda g: (len(g), max(str(p) for p in g)))
    for fp, group in groups.items():
        if group is not best:
            for ckpt in group:
                skipped.append((ckpt, f"validated on another split than the {len(best)} runs taken"))
    return Discovery(taken=best, skipped=skipped, data_root=data)


def run_keep(run: Path) -> str:
    """The run's `[runtime] keep` ("best" when its recipe.toml does not say or cannot be read)."""
    try:
        keep = tomllib.loads((run / "recipe.toml").read_text(encoding="utf-8")).get("runtime", {}).get("keep")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return "best"
    return keep if keep in ("best", "last") else "best"


# --------------------------------------------------------------------------- checks


def check_members(metas: Sequence[tuple[str, CheckpointMeta]]) -> None:
    """Same class list (names and order) and same val split for every member."""
    ref_src, ref = metas[0]
    for src, meta in metas[1:]:
        if meta.classes != ref.classes:
            if len(meta.classes) != len(ref.classes):
                detail = f"{len(meta.classes)} classes vs {len(ref.classes)}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(meta.classes, ref.classes)) if a != b)
                detail = f"class {i + 1} is {meta.classes[i]!r} vs {ref.classes[i]!r}"
            raise UserError(f"{src}: its class list differs from {ref_src}'s ({detail}); ensemble members must be "
                            "trained on the same classes in the same order")
        a, b = ref.split.get("val_fingerprint"), meta.split.get("val_fingerprint")
        if a != b:
            raise UserError(
                f"{src}: validated on another split than {ref_src} ({describe_split(meta.split)} vs "
                f"{describe_split(ref.split)}); ensemble members must share the val split (same [data] split, "
                "val_fraction and split_seed on the same train.csv)")


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


def val_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random half of n val images (to fit on) and the other half (to score on)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def auto_weights_problem(targets: np.ndarray, seed: int = 0) -> str | None:
    """Why --weights auto cannot work on these val labels (None when it can): fitting and the
    held-out check need a class with a positive in each half of the split."""
    fit, score = val_halves(len(targets), seed)
    for rows, what in ((fit, "the half it fits on"), (score, "the half it is scored on")):
        if not (targets[rows] == 1).any():
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


def held_out_gain(probs: np.ndarray, targets: np.ndarray, seed: int = 0) -> HeldOut:
    """Fit on a seeded random half of the val images, score on the other half."""
    fit, score = val_halves(probs.shape[1], seed)
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


@dataclass
class EnsembleResult:
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

    def to_json(self) -> dict:
        """The result file `aicoss report --ensemble` reads (`<out stem>.json` beside the submission)."""
        finite = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
        return {
            "format": RESULT_FORMAT, "submission": str(self.out),
            "members": [{"path": m.path, "arch": m.arch, "img_size": m.img_size, "weight": m.weight,
                         "val_map": finite(m.val_map)} for m in self.members],
            "val_map": finite(self.val_map), "equal_val_map": finite(self.equal_val_map),
            "weighting": self.weighting, "n_val": self.n_val, "n_test": self.n_test,
            "img_per_s": round(self.img_per_s, 3), "seconds": round(self.seconds, 3), "device": self.device,
            "precision": self.precision,
            "per_class": json_ready(self.per_class) or None,
            "per_class_csv": None if self.per_class_path is None else str(self.per_class_path),
            "labels": None if self.thresholds is None else self.thresholds.to_json(self.labels_path,
                                                                                   self.thresholds_path),
        }


RESULT_FORMAT = "aicoss-ensemble-result/1"


def result_path_for(out: Path) -> Path:
    return Path(out).with_suffix(".json")


def run_ensemble(checkpoints: Sequence[Path] = (), *, spec: Path | None = None, fp16: bool = False,
                 weights: str | None = None, data: Path | None = None, out: Path | None = None,
                 runs_dir: Path = Path("runs"), tta: str = "none", batch_size: int = 64,
                 num_workers: int | None = None, device: str = "auto", labels: str | None = None,
                 overwrite: bool = False, progress=None) -> EnsembleResult:
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
    metas = [(str(s.path), member_meta(s.path)) for s in sources]
    check_members(metas)
    ref_src, ref = metas[0]
    root = Path(data) if data is not None else spec_data if spec_data is not None else ref.resolve_data_root(None, ref_src)
    test = read_test(root, ref.classes)
    has_split = bool(ref.split.get("val_fingerprint"))
    notes: list[str] = []
    val_paths: list[str] = []
    targets = None
    if has_split:
        table = read_train(root)
        ref.check_classes(table.classes, ref_src, root / "train.csv")
        _, rows = split_from_record(ref.split, table, ref_src)
        val_paths, targets = [table.paths[i] for i in rows], table.labels[rows]
    else:
        notes.append("the members have no val split in their metadata: no val mAP, equal or spec weights only")
        if weights == "auto":
            raise UserError(f"{ref_src}: --weights auto fits on the val split, and these members record none")
        if spec_labels == "auto":
            raise UserError(f"{ref_src}: --labels auto fits on the val split, and these members record none")
    out = Path(out) if out is not None else Path("ensemble_submission.csv")
    inputs = [s.path for s in sources] + ([Path(spec)] if spec else []) + data_inputs(root)
    outputs = [out, result_path_for(out), *([per_class_path_for(out)] if has_split else []),
               *(label_output_paths(out) if spec_labels is not None else [])]
    check_outputs(outputs, inputs, overwrite)
    if isinstance(spec_labels, Path):
        read_thresholds_csv(spec_labels, ref.classes)  # a bad thresholds file fails before any compute
    if weights == "auto" and len(sources) > 1 and auto_weights_problem(targets):
        notes.append(f"--weights auto falls back to equal weights: {auto_weights_problem(targets)}")
        weights = "equal"

    rt = make_runtime(device, "fp16" if fp16 else "fp32", num_workers)
    notes = rt.notes + notes
    t0 = time.perf_counter()
    members = load_members(sources, rt, default_tta=tta, progress=progress)
    spec_weights = [m.weight for m in members]
    weighting = "equal"
    final = np.full(len(members), 1.0 / len(members))
    if weights is None and any(s.weight is not None for s in sources):
        weighting, final = "spec", np.asarray(spec_weights) / sum(spec_weights)
    reports = [MemberReport(m.path, m.meta.arch, m.img_size, m.tta, 0.0, None, m.meta.val_map) for m in members]
    result = EnsembleResult(reports, out, len(test), len(val_paths), rt.describe(), weighting, 0.0, notes=notes,
                            discovery=discovery)
    if has_split:
        val_probs = forward(members, val_paths, rt, batch_size, progress=progress,
                            what=f"val: {len(val_paths)} images × {len(members)} members").numpy()
        for report, p in zip(reports, val_probs):
            report.val_map = mean_average_precision(targets, p)
        result.equal_val_map = mean_average_precision(targets, val_probs.mean(axis=0))
        if weights == "auto" and len(members) > 1:
            result.held_out = held_out_gain(val_probs, targets)
            final = fit_weights(val_probs, targets)
            weighting = "auto"
            if result.held_out.gain < 0:
                notes.append(f"auto weights score {-result.held_out.gain:.4f} mAP below equal weights on the "
                             "held-out half: they fit noise of this val split; prefer --weights equal here")
        elif weights == "auto":
            notes.append("one member: --weights auto has nothing to weigh")
        combined_val = np.tensordot(final, val_probs, axes=1)
        result.val_map = mean_average_precision(targets, combined_val)
        weaker = weaker_than_best(weighting, result.val_map, reports)
        if weaker:
            notes.append(weaker)
    if spec_labels is not None:
        result.thresholds = resolve_thresholds(spec_labels, ref.classes, targets, combined_val if has_split else None)
    if has_split:
        threshold = result.thresholds if result.thresholds is not None else DEFAULT_THRESHOLD
        result.per_class = per_class_rows(ref.classes, targets, combined_val, threshold)
        result.per_class_path = per_class_path_for(out)
        write_per_class_csv(result.per_class_path, result.per_class)
    result.weighting = weighting
    for report, w in zip(reports, final):
        report.weight = float(w)
    t_test = time.perf_counter()
    test_probs = forward(members, test.paths, rt, batch_size, progress=progress,
                         what=f"test: {len(test)} images × {len(members)} members")
    result.img_per_s = len(test) / max(time.perf_counter() - t_test, 1e-9)
    combined = combine(test_probs, final)
    write_scores_csv(out, test.ids, test.classes, combined)
    if result.thresholds is not None:
        result.labels_path, result.thresholds_path = write_label_outputs(out, test.ids, test.classes,
                                                                         combined.numpy(), result.thresholds)
    result.seconds = time.perf_counter() - t0
    result.device, result.precision = rt.describe().split(", ")[0], rt.precision
    result.result_path = result_path_for(out)
    write_text_atomic(result.result_path, json.dumps(result.to_json(), indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- benchmark


def run_benchmark(checkpoints: Sequence[Path], *, data: Path | None = None, limit: int | None = None,
                  batch_size: int = 64, num_workers: int | None = None, device: str = "auto",
                  progress=None) -> dict:
    """The same ensemble over the same val images in fp32 and in half precision (after a warm-up of
    each): time, img/s and val mAP of both, their differences in %, and the largest |Δ probability|."""
    if not checkpoints:
        raise UserError("benchmark-fp16 needs at least one CHECKPOINT")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be ≥ 1 (got {limit})")
    sources = [MemberSource(Path(p)) for p in checkpoints]
    metas = [(str(s.path), member_meta(s.path)) for s in sources]
    check_members(metas)
    ref_src, ref = metas[0]
    root = ref.resolve_data_root(data, ref_src)
    table = read_train(root)
    ref.check_classes(table.classes, ref_src, root / "train.csv")
    _, rows = split_from_record(ref.split, table, ref_src)
    if limit is not None:
        rows = rows[:limit]
    paths, targets = [table.paths[i] for i in rows], table.labels[rows]

    rt = make_runtime(device, "fp32", num_workers)
    half = half_dtype(rt.device)
    notes = list(rt.notes)
    if rt.device.type != "cuda":
        notes.append("fp16 needs CUDA: the half-precision column is bf16 on the CPU")
    members = load_members(sources, rt, progress=progress)
    warm = paths[: min(len(paths), 2 * batch_size)]
    for dtype in (None, half):
        run = rt.with_precision(dtype)
        forward(members, warm, run, batch_size, progress=progress, what=f"warm-up ({run.precision})")
    timings = {}
    for label, dtype in (("fp32", None), ("half", half)):
        run = rt.with_precision(dtype)
        run.synchronize()
        t0 = time.perf_counter()
        probs = forward(members, paths, run, batch_size, progress=progress,
                        what=f"{run.precision}: {len(paths)} images × {len(members)} members")
        run.synchronize()
        seconds = time.perf_counter() - t0
        ens = combine(probs)
        timings[label] = {"seconds": seconds, "img_per_sec": len(paths) / seconds,
                          "val_map": mean_average_precision(targets, ens.numpy()), "probs": ens}

    def pct(new: float, old: float) -> float:
        return (new - old) / old * 100.0 if old else float("nan")

    a, b = timings["fp32"], timings["half"]
    return {
        "device": rt.describe().split(", ")[0],
        "half_dtype": rt.with_precision(half).precision,
        "members": [{"path": s, "arch": m.arch, "img_size": m.img_size} for s, m in metas],
        "images": len(paths),
        "batch_size": batch_size,
        "loader": rt.loader,
        "fp32": {k: v for k, v in a.items() if k != "probs"},
        "half": {k: v for k, v in b.items() if k != "probs"},
        "diff_pct": {"seconds": pct(b["seconds"], a["seconds"]), "img_per_sec": pct(b["img_per_sec"], a["img_per_sec"]),
                     "val_map": pct(b["val_map"], a["val_map"])},
        "max_abs_prob_diff": float((a["probs"] - b["probs"]).abs().max()),
        "notes": notes,
    }

