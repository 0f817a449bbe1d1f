"""Ensembles from checkpoints: members and their checks, the ENSEMBLE.toml spec, `runs/` discovery,
member weights, and the predict / ensemble / benchmark jobs the CLI calls (a `predict` is an
ensemble of one member).

Members must share the class list (names and order) and the validation split (the checkpoint's
`split` metadata, verified against train.csv with `data.split_fingerprint`), so their val scores
can be compared and combined. The output is the weighted mean of the members' sigmoid outputs.
"""

from __future__ import annotations

import os
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from aicoss_cli.checkpoint import CheckpointMeta, model_from_checkpoint, read_meta
from aicoss_cli.errors import UserError

SPLIT_KEYS = ("kind", "val_fraction", "split_seed", "val_fingerprint")
DATA_FILES = ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv")


# --------------------------------------------------------------------------- where members come from


@dataclass
class MemberSource:
    path: Path
    weight: float | None = None
    tta: str | None = None


def read_spec(path: Path) -> tuple[list[MemberSource], Path | None]:
    """Members (and the optional data root) of an ENSEMBLE.toml:

        data = "data/aicoss"            # optional
        [[member]]
        path = "runs/a/20240101T000000Z/best.safetensors"
        weight = 2.0                    # optional, default 1
        tta = "hflip"                   # optional: none | hflip | flips

    Relative paths are relative to the spec file's folder."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class SpecMember(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        weight: float | None = Field(None, ge=0)
        tta: Literal["none", "hflip", "flips"] | None = None

    class Spec(BaseModel):
        model_config = ConfigDict(extra="forbid")
        data: str | None = None
        member: list[SpecMember] = Field(min_length=1)

    from aicoss_cli.recipe import read_toml

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
    return members, (base / spec.data) if spec.data else None


@dataclass
class Discovery:
    """What `aicoss ensemble` with no member named took from the runs folder, and what it skipped."""

    taken: list[Path]
    skipped: list[tuple[Path, str]]
    data_root: Path


def recipe_data_root(meta: CheckpointMeta) -> Path | None:
    """The `[data] root` of the recipe stored in a checkpoint (None if it has none)."""
    try:
        root = tomllib.loads(meta.recipe_toml).get("data", {}).get("root") if meta.recipe_toml else None
    except tomllib.TOMLDecodeError:
        return None
    return Path(root) if isinstance(root, str) and root else None


def discover_runs(runs_dir: Path, data: Path | None) -> Discovery:
    """best.safetensors of every run folder runs_dir/<name>/<timestamp>/ whose classes and val split
    match the data. Runs validated on another split than the largest group are skipped."""
    from aicoss_cli.data import read_train

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no runs folder; name the members (aicoss ensemble A.safetensors "
                        "B.safetensors), give --spec ENSEMBLE.toml, or point --runs at the folder `aicoss train` wrote")
    skipped: list[tuple[Path, str]] = []
    readable: list[tuple[Path, CheckpointMeta]] = []
    for run in sorted(p for p in runs_dir.glob("*/*") if p.is_dir()):
        ckpt = run / "best.safetensors"
        if not ckpt.is_file():
            skipped.append((run, "no best.safetensors (no epoch finished)"))
            continue
        try:
            readable.append((ckpt, read_meta(ckpt)))
        except UserError as exc:
            skipped.append((ckpt, str(exc).removeprefix(f"{ckpt}: ")))
    if not readable:
        why = f" (skipped: {'; '.join(f'{p}: {r}' for p, r in skipped[:3])})" if skipped else ""
        raise UserError(f"{runs_dir}: no run with a readable best.safetensors{why}; train one with `aicoss train RECIPE`")
    if data is None:
        roots = sorted({str(r) for r in (recipe_data_root(m) for _, m in readable) if r is not None})
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
            val_rows_for(meta, table, str(ckpt))
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
                f"{src}: validated on another split than {ref_src} ({_split_text(meta.split)} vs "
                f"{_split_text(ref.split)}); ensemble members must share the val split (same [data] split, "
                "val_fraction and split_seed on the same train.csv)")


def _split_text(split: dict) -> str:
    if not split:
        return "no split recorded"
    return (f"{split.get('kind')} split, val_fraction {split.get('val_fraction')}, split_seed "
            f"{split.get('split_seed')}, fingerprint {split.get('val_fingerprint')}")


def check_classes(meta: CheckpointMeta, classes: Sequence[str], source: str, csv: Path) -> None:
    if list(classes) != meta.classes:
        if sorted(classes) == sorted(meta.classes):
            detail = "the same names in another order"
        else:
            missing = [c for c in meta.classes if c not in classes]
            extra = [c for c in classes if c not in meta.classes]
            detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
        raise UserError(f"{source}: trained on {meta.num_classes} classes but {csv} has {len(classes)} "
                        f"({detail}); pass the --data it was trained on")


def val_rows_for(meta: CheckpointMeta, table, source: str) -> np.ndarray:
    """The checkpoint's own val rows in `table`, rebuilt from its split metadata and verified."""
    from aicoss_cli.data import split_fingerprint, split_indices

    split = meta.split or {}
    csv = table.root / "train.csv"
    if not all(k in split for k in SPLIT_KEYS):
        raise UserError(f"{source}: no validation split in its metadata (not written by `aicoss train`?); "
                        "its val scores cannot be rebuilt")
    if split.get("n_rows") is not None and int(split["n_rows"]) != len(table):
        raise UserError(f"{source}: validated on a train.csv of {split['n_rows']} rows but {csv} has {len(table)}; "
                        "pass the --data it was trained on")
    _, val = split_indices(table.labels, split["kind"], float(split["val_fraction"]), int(split["split_seed"]))
    found = split_fingerprint(table.ids, val)
    if found != split["val_fingerprint"]:
        raise UserError(f"{source}: its val split ({_split_text(split)}) selects other images in {csv} "
                        f"(fingerprint {found}); pass the --data it was trained on")
    return val


def check_output(path: Path, inputs: Sequence[Path]) -> None:
    """--out must be a writable file path that is none of the inputs (checked before any compute)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --out takes the path of a CSV file")
    target = path.resolve()
    for item in inputs:
        if Path(item).exists() and target == Path(item).resolve():
            raise UserError(f"{path}: is an input of this command ({item}); choose another --out")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{path}: cannot be written ({ancestor} is not a folder); choose another --out")
    if ancestor == path.parent:
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=ancestor)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another --out") from None
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written ({ancestor} is not writable); choose another --out")


def _write_csv(path: Path, ids, classes, probs) -> None:
    from aicoss_cli.inference import write_scores_csv

    try:
        write_scores_csv(path, ids, classes, probs)
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another --out") from None


def _data_inputs(root: Path) -> list[Path]:
    return [root / name for name in DATA_FILES]


def resolve_data_root(data: Path | None, meta: CheckpointMeta, source: str) -> Path:
    if data is not None:
        return Path(data)
    root = recipe_data_root(meta)
    if root is None:
        raise UserError(f"{source}: no data root in its stored recipe; pass --data DIR")
    return root


# --------------------------------------------------------------------------- weights


def fit_weights(probs: np.ndarray, targets: np.ndarray, rounds: int | None = None) -> np.ndarray:
    """Non-negative member weights that sum to 1, by greedy forward selection with replacement
    (Caruana et al., "Ensemble selection from libraries of models", 2004).

    Start from an empty ensemble; each round adds the member (repeats allowed) whose addition gives
    the highest macro mAP of the running mean; weight_m = (times m was added) / (additions), taken
    at the round with the best mAP. Weights are multiples of 1/rounds; a member never chosen gets 0."""
    from aicoss_cli.metrics import mean_average_precision

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


def held_out_gain(probs: np.ndarray, targets: np.ndarray, seed: int = 0) -> HeldOut:
    """Fit on a seeded random half of the val images, score on the other half."""
    from aicoss_cli.metrics import mean_average_precision

    n = probs.shape[1]
    order = np.random.default_rng(seed).permutation(n)
    fit, score = np.sort(order[: n // 2]), np.sort(order[n // 2:])
    w = fit_weights(probs[:, fit], targets[fit])
    equal = mean_average_precision(targets[score], probs[:, score].mean(axis=0))
    auto = mean_average_precision(targets[score], np.tensordot(w, probs[:, score], axes=1))
    return HeldOut(len(fit), len(score), [float(v) for v in w], equal, auto)


# --------------------------------------------------------------------------- shared set-up


@dataclass
class Runtime:
    device: Any
    amp_dtype: Any
    workers: int
    channels_last: bool
    notes: list[str]

    @property
    def pin(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        import torch

        from aicoss_cli.inference import dtype_name

        if self.device.type == "cuda":
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = f"cpu ({torch.get_num_threads()} threads)"
        return f"{where}, {dtype_name(self.amp_dtype)}, {self.loader}"

    @property
    def background(self) -> bool:
        """Decode in a background thread: only when the model runs on another device."""
        return self.device.type == "cuda" and self.workers == 0

    @property
    def loader(self) -> str:
        if self.workers:
            return f"{self.workers} loader processes"
        return "1 decode thread" if self.background else "decoding inline"


def make_runtime(device: str, precision: str, num_workers: int | None) -> Runtime:
    import torch

    from aicoss_cli.inference import default_workers, inference_device, precision_dtype

    dev = inference_device(device)
    notes: list[str] = []
    amp = precision_dtype(precision, dev, notes)
    if num_workers is not None and num_workers < 0:
        raise UserError(f"--num-workers must be ≥ 0 (got {num_workers})")
    workers = default_workers(dev) if num_workers is None else num_workers
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    return Runtime(dev, amp, workers, channels_last=dev.type == "cuda", notes=notes)


def load_members(sources: Sequence[MemberSource], rt: Runtime, default_tta: str = "none", progress=None) -> list:
    """Rebuild each member's model from its checkpoint, on the device, in eval mode."""
    import torch

    from aicoss_cli.inference import TTA_MODES, Member, torchvision_jpeg

    torchvision_jpeg()  # import the decoder now, not inside the first batch
    if default_tta not in TTA_MODES:
        raise UserError(f"--tta must be one of {', '.join(TTA_MODES)} (got {default_tta!r})")
    task = progress.add_task("loading checkpoints", total=len(sources)) if progress else None
    members = []
    for src in sources:
        model, meta = model_from_checkpoint(src.path)
        model.to(rt.device)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        weight = 1.0 if src.weight is None else float(src.weight)
        members.append(Member(path=str(src.path), model=model, img_size=meta.img_size, classes=meta.classes,
                              weight=weight, tta=src.tta or default_tta, meta=meta))
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    return members


def forward(members, paths: Sequence[str], rt: Runtime, batch_size: int, progress=None, what: str = "images"):
    """(M, n, K) sigmoid outputs of every member on the images at `paths`, with a progress bar."""
    from aicoss_cli.inference import ImageBatches, member_probabilities

    sizes = sorted({m.img_size for m in members})
    batches = ImageBatches(paths, sizes, batch_size, workers=rt.workers, background=rt.background, pin=rt.pin)
    task = progress.add_task(what, total=len(paths)) if progress else None
    try:
        return member_probabilities(members, batches, len(paths), rt.device, rt.amp_dtype, rt.channels_last,
                                    on_batch=(lambda n: progress.advance(task, n)) if progress else None)
    finally:
        if progress:
            progress.remove_task(task)


# --------------------------------------------------------------------------- predict


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
    from aicoss_cli.data import read_test, read_train
    from aicoss_cli.inference import TTA_MODES

    if split not in ("test", "val"):
        raise UserError(f"--split must be test or val (got {split!r})")
    if tta not in TTA_MODES:
        raise UserError(f"--tta must be one of {', '.join(TTA_MODES)} (got {tta!r})")
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    root = resolve_data_root(data, meta, str(checkpoint))
    targets = None
    if split == "test":
        test = read_test(root, meta.classes)
        ids, paths = test.ids, test.paths
    else:
        table = read_train(root)
        check_classes(meta, table.classes, str(checkpoint), root / "train.csv")
        rows = val_rows_for(meta, table, str(checkpoint))
        ids, paths, targets = [table.ids[i] for i in rows], [table.paths[i] for i in rows], table.labels[rows]
    out = Path(out) if out is not None else default_predict_out(checkpoint, split)
    per_class_path = out.parent / "per_class_ap.csv" if split == "val" else None
    inputs = [checkpoint, *_data_inputs(root)]
    check_output(out, inputs)
    if per_class_path is not None:
        if per_class_path.resolve() == out.resolve():
            raise UserError(f"{out}: per_class_ap.csv is written beside --out; give --out another name")
        check_output(per_class_path, inputs)

    rt = make_runtime(device, precision, num_workers)
    t0 = time.perf_counter()
    members = load_members([MemberSource(checkpoint, 1.0, tta)], rt, progress=progress)
    t1 = time.perf_counter()
    probs = forward(members, paths, rt, batch_size, progress, f"predicting {len(paths)} {split} images")[0]
    result = PredictResult(checkpoint, out, split, len(paths), meta.classes, rt.describe(), tta, 0.0,
                           time.perf_counter() - t1, rt.notes)
    if targets is not None:
        result.per_class, result.val_map = per_class_table(meta.classes, targets, probs.numpy())
        _write_per_class(per_class_path, result.per_class)
        result.per_class_path = per_class_path
    _write_csv(out, ids, meta.classes, probs)
    result.seconds = time.perf_counter() - t0
    return result


def per_class_table(classes: Sequence[str], targets: np.ndarray, scores: np.ndarray) -> tuple[list[dict], float]:
    """Per-class AP rows (class, positives, ap, rank: 1 = weakest) and the macro mAP."""
    from aicoss_cli.metrics import average_precision_per_class, mean_average_precision

    aps = average_precision_per_class(targets, scores)
    order = [int(i) for i in np.argsort(np.where(np.isnan(aps), np.inf, aps), kind="stable")]
    rank = {j: r + 1 for r, j in enumerate(order) if not np.isnan(aps[j])}
    rows = [{"class": c, "positives": int((targets[:, j] > 0).sum()), "ap": float(aps[j]), "rank": rank.get(j)}
            for j, c in enumerate(classes)]
    return rows, mean_average_precision(targets, scores)


def _write_per_class(path: Path, rows: list[dict]) -> None:
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


def run_ensemble(checkpoints: Sequence[Path] = (), *, spec: Path | None = None, fp16: bool = False,
                 weights: str | None = None, data: Path | None = None, out: Path | None = None,
                 runs_dir: Path = Path("runs"), tta: str = "none", batch_size: int = 64,
                 num_workers: int | None = None, device: str = "auto", progress=None) -> EnsembleResult:
    """Weighted mean of the members' sigmoid outputs on the test set; every member's and the
    ensemble's val mAP on their shared val split."""
    from aicoss_cli.data import read_test, read_train
    from aicoss_cli.inference import combine
    from aicoss_cli.metrics import mean_average_precision

    if weights not in (None, "equal", "auto"):
        raise UserError(f"--weights must be equal or auto (got {weights!r})")
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
    metas = [(str(s.path), read_meta(s.path)) for s in sources]
    check_members(metas)
    ref_src, ref = metas[0]
    root = Path(data) if data is not None else spec_data if spec_data is not None else resolve_data_root(None, ref, ref_src)
    test = read_test(root, ref.classes)
    has_split = bool(ref.split.get("val_fingerprint"))
    notes: list[str] = []
    val_paths: list[str] = []
    targets = None
    if has_split:
        table = read_train(root)
        check_classes(ref, table.classes, ref_src, root / "train.csv")
        rows = val_rows_for(ref, table, ref_src)
        val_paths, targets = [table.paths[i] for i in rows], table.labels[rows]
    else:
        notes.append("the members have no val split in their metadata: no val mAP, equal or spec weights only")
        if weights == "auto":
            raise UserError(f"{ref_src}: --weights auto fits on the val split, and these members record none")
    out = Path(out) if out is not None else Path("ensemble_submission.csv")
    check_output(out, [s.path for s in sources] + ([Path(spec)] if spec else []) + _data_inputs(root))

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
        val_probs = forward(members, val_paths, rt, batch_size, progress,
                            f"val: {len(val_paths)} images × {len(members)} members").numpy()
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
        result.val_map = mean_average_precision(targets, np.tensordot(final, val_probs, axes=1))
    result.weighting = weighting
    for report, w in zip(reports, final):
        report.weight = float(w)
    test_probs = forward(members, test.paths, rt, batch_size, progress,
                         f"test: {len(test)} images × {len(members)} members")
    _write_csv(out, test.ids, test.classes, combine(test_probs, final))
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- benchmark


def run_benchmark(checkpoints: Sequence[Path], *, data: Path | None = None, limit: int | None = None,
                  batch_size: int = 64, num_workers: int | None = None, device: str = "auto",
                  progress=None) -> dict:
    """The same ensemble over the same val images in fp32 and in half precision (after a warm-up of
    each): time, img/s and val mAP of both, their differences in %, and the largest |Δ probability|."""
    from aicoss_cli.data import read_train
    from aicoss_cli.inference import combine, dtype_name, half_dtype
    from aicoss_cli.metrics import mean_average_precision

    if not checkpoints:
        raise UserError("benchmark-fp16 needs at least one CHECKPOINT")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be ≥ 1 (got {limit})")
    sources = [MemberSource(Path(p)) for p in checkpoints]
    metas = [(str(s.path), read_meta(s.path)) for s in sources]
    check_members(metas)
    ref_src, ref = metas[0]
    root = resolve_data_root(data, ref, ref_src)
    table = read_train(root)
    check_classes(ref, table.classes, ref_src, root / "train.csv")
    rows = val_rows_for(ref, table, ref_src)
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
        forward(members, warm, replace(rt, amp_dtype=dtype), batch_size, progress, f"warm-up ({dtype_name(dtype)})")
    timings = {}
    for label, dtype in (("fp32", None), ("half", half)):
        _sync(rt.device)
        t0 = time.perf_counter()
        probs = forward(members, paths, replace(rt, amp_dtype=dtype), batch_size, progress,
                        f"{dtype_name(dtype)}: {len(paths)} images × {len(members)} members")
        _sync(rt.device)
        seconds = time.perf_counter() - t0
        ens = combine(probs)
        timings[label] = {"seconds": seconds, "img_per_sec": len(paths) / seconds,
                          "val_map": mean_average_precision(targets, ens.numpy()), "probs": ens}

    def pct(new: float, old: float) -> float:
        return (new - old) / old * 100.0 if old else float("nan")

    a, b = timings["fp32"], timings["half"]
    return {
        "device": rt.describe().split(", ")[0],
        "half_dtype": dtype_name(half),
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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
