"""Distillation: one student trained by the one training loop against an ensemble's probabilities
as well as the labels (`aicoss distill`, or any recipe with a `[distill]` table).

The teacher is the weighted mean of its members' sigmoid outputs, as `aicoss ensemble` computes
it: members from checkpoint files, run folders (their kept checkpoint) or ENSEMBLE.toml specs
(with their weights and TTA), loaded by `infer.forward.load_members`, combined by
`infer.forward.combine`. A micro-batch's loss is `distill_loss`:

    weight · BCE(student logits, teacher probabilities) + (1 − weight) · recipe loss on the labels

The teacher's probabilities come, by `[distill] mode`, from
- "online" (default): the members, in eval mode, without gradients and in `[runtime]
  eval_precision`, on the very augmented uint8 batch the student sees, resized on the device to
  each member's input size (bilinear, antialiased) and normalised: the teacher must see the
  student's view (Beyer et al., "A good teacher is patient and consistent", CVPR 2022);
- "cached": the members on the clean images, once, through `infer.forward.forward`, stored in the
  run folder (`distill_cache.safetensors`, keyed by image id and the teachers' fingerprint) and
  read back on resume: for big teachers with light or no augmentation.

Unlabeled images (`[distill] unlabeled`: "test" and/or img_id,img_path CSVs) join the training
rows with the teacher term only; validation never sees them, and the student's val split must be
the teachers' own (else they trained on its val images). What the teacher scores on val and how
fast it runs go to `distill.json` (`results.distillation`) and the student's checkpoint metadata.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from aicoss_cli.base.console import progress_display
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import read_safetensors, write_safetensors
from aicoss_cli.base.runtime import Runtime
from aicoss_cli.data.images import check_images
from aicoss_cli.data.loading import Normalizer
from aicoss_cli.data.splits import describe_split
from aicoss_cli.data.tables import read_image_list
from aicoss_cli.evaluation.metrics import mean_average_precision
from aicoss_cli.infer.forward import Member, MemberSource, combine, forward, is_onnx, load_members, member_meta
from aicoss_cli.infer.members import check_members, read_spec
from aicoss_cli.models.checkpoint import CheckpointMeta
from aicoss_cli.results.distillation import DistillRecord, TeacherMember, load_distill_record, write_distill_record
from aicoss_cli.results.layout import DISTILL_CACHE_FILE, DISTILL_FILE, is_cv_dir, is_run_dir, kept_file, run_keep
from aicoss_cli.train.prepare import PreparedData
from aicoss_cli.train.state import Resume

CACHE_FORMAT = "aicoss-distill-cache/1"


# --------------------------------------------------------------------------- the loss


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, loss_fn: torch.nn.Module,
                 weight: float, labeled: torch.Tensor | None = None) -> torch.Tensor:
    """weight · D + (1 − weight) · L for one micro-batch of logits s (B, K), with

        D = Σ_ij BCE(s_ij, q_ij),  BCE(s, q) = −q·log σ(s) − (1 − q)·log(1 − σ(s)),  q: the teacher's
            probabilities, over every entry of every row (−1 labels and unlabeled rows included);
            divided by B·K when the recipe loss averages (`loss_fn.reduction` "mean"), summed when it sums
        L = loss_fn(s[labeled], y[labeled]): the recipe loss on the rows with labels (`labeled`: their
            positions; None: every row), which treats −1 labels as it always does; 0 when no row has labels.

    A weight of 1 skips L and a weight of 0 skips D (`teacher` may then be None)."""
    total = logits.new_zeros(())
    if weight > 0:
        reduction = "sum" if loss_fn.reduction == "sum" else "mean"
        total = total + weight * F.binary_cross_entropy_with_logits(logits, teacher.to(logits.dtype),
                                                                    reduction=reduction)
    if weight < 1 and (labeled is None or labeled.numel() > 0):
        if labeled is not None:
            logits, targets = logits.index_select(0, labeled), targets.index_select(0, labeled)
        total = total + (1 - weight) * loss_fn(logits, targets)
    return total


@dataclass
class TeacherTargets:
    """What the teacher gives one micro-batch: its probabilities and which rows have labels."""

    probs: torch.Tensor | None  # (B, K) on the device; None when weight = 0
    labeled: torch.Tensor | None  # positions of the labelled rows, on the device; None: every row
    weight: float

    def loss(self, loss_fn: torch.nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distill_loss(logits, targets, self.probs, loss_fn, self.weight, self.labeled)


# --------------------------------------------------------------------------- the teachers


def teacher_sources(path: str | Path) -> list[MemberSource]:
    """The members one teacher PATH names: a checkpoint file, a run folder (its kept checkpoint,
    `[runtime] keep`) or an ENSEMBLE.toml spec (its members, weights and TTA)."""
    path = Path(path)
    if is_onnx(path):
        raise UserError(f"{path}: an exported .onnx model cannot teach (the teachers run in PyTorch on the training "
                        "device); name the .safetensors checkpoint it was exported from")
    if is_cv_dir(path):
        raise UserError(f"{path}: a cross-validation folder cannot teach: its fold models trained on every image of "
                        "train.csv, the student's val images included; name single-split runs or checkpoints")
    if path.is_dir():
        if not is_run_dir(path):
            raise UserError(f"{path}: not a run folder (runs/<name>/<timestamp>); a teacher is a checkpoint, a run "
                            "folder or an ENSEMBLE.toml")
        checkpoint = kept_file(path, run_keep(path))
        if not checkpoint.is_file():
            raise UserError(f"{path}: no {checkpoint.name} (no epoch finished); let the run finish an epoch first")
        return [MemberSource(checkpoint)]
    if not path.is_file():
        raise UserError(f"{path}: teacher not found; give a checkpoint, a run folder or an ENSEMBLE.toml")
    if path.suffix.lower() == ".toml":
        # a spec's run folder gives its kept checkpoint, as one named directly (a CV folder is refused)
        return [replace(m, path=teacher_sources(m.path)[0].path) if m.path.is_dir() else m for m in read_spec(path)[0]]
    return [MemberSource(path)]


def teacher_weights(sources: Sequence[MemberSource]) -> np.ndarray:
    """The members' weights as `aicoss ensemble` takes them without --weights: the spec's where one
    gives any (a member without a weight counts 1), else equal; normalised to sum 1."""
    if not any(s.weight is not None for s in sources):
        return np.full(len(sources), 1.0 / len(sources))
    weights = np.array([1.0 if s.weight is None else float(s.weight) for s in sources])
    return weights / weights.sum()


def check_teachers(metas: Sequence[tuple[str, CheckpointMeta]], data: PreparedData, exif_transpose: bool) -> None:
    """The teachers share classes and val split among themselves (`check_members`), their classes
    are the data's, they decode images as the student does (`[data] exif_transpose`: online, they
    see the student's batches), and their val split is the student's: a student validated on
    images its teachers trained on would score what they memorised."""
    check_members(metas)
    for source, meta in metas:
        meta.check_classes(data.table.classes, source, data.table.root / "train.csv")
        if meta.exif_transpose != exif_transpose:
            raise UserError(f"{source}: the teacher's recipe has [data] exif_transpose = "
                            f"{str(meta.exif_transpose).lower()}, the student's {str(exif_transpose).lower()}; a "
                            "teacher must see the pixels it was trained on: set the student's to the teachers'")
    source, meta = metas[0]
    theirs, ours = meta.split.get("val_fingerprint"), data.split["val_fingerprint"]
    if theirs != ours:
        raise UserError(f"{source}: the teachers were validated on another split ({describe_split(meta.split)}) than "
                        f"the student's ({describe_split(data.split)}), so they trained on the student's val images; "
                        "give the student the teachers' [data] split, val_fraction and split_seed")


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(shas: Sequence[str], weights: np.ndarray, ttas: Sequence[str]) -> str:
    """What the teacher is: the members' files, normalised weights and TTA, hashed."""
    text = json.dumps([[s, round(float(w), 12), t] for s, w, t in zip(shas, weights, ttas)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- unlabeled images


def unlabeled_images(entries: Sequence[str], data: PreparedData, progress=None) -> tuple[list[str], list[str]]:
    """(ids, paths) of the `[distill] unlabeled` images: "test" (test.csv, checked with the data)
    and img_id,img_path CSVs (every image checked here). None may be a train.csv image (the val
    images would leak into training) nor listed twice."""
    ids, paths, where = [], [], []
    for entry in entries:
        if entry == "test":
            more_ids, more_paths, csv = data.test.ids, data.test.paths, data.test.root / "test.csv"
        else:
            csv = Path(entry)
            more_ids, more_paths = read_image_list(csv)
            task = progress.add_task(f"checking {csv.name} images", total=len(more_paths)) if progress else None
            check_images(more_paths, csv, (lambda n: progress.advance(task, n)) if progress else None)
            if progress:
                progress.remove_task(task)
        ids += more_ids
        paths += more_paths
        where += [csv] * len(more_ids)
    train_ids, train_paths, seen = set(data.table.ids), set(data.table.paths), set()
    for img_id, path, csv in zip(ids, paths, where):
        if img_id in train_ids or path in train_paths:
            raise UserError(f"{csv}: image {img_id!r} ({path}) is also in {data.table.root / 'train.csv'}; unlabeled "
                            "images must be others (train.csv's val images would leak into training)")
        if img_id in seen:
            raise UserError(f"{csv}: image id {img_id!r} is listed twice in [distill] unlabeled; list each image once")
        seen.add(img_id)
    return ids, paths


# --------------------------------------------------------------------------- the distillation


class Distillation:
    """The teacher of a run, built by `build_distillation`: the unlabeled images it adds (see
    `train_items`), its targets for each micro-batch (`targets`), and its record (`record`:
    distill.json, written by `write`, and the student checkpoint's metadata)."""

    def __init__(self, config, members: list[Member], weights: np.ndarray, record: DistillRecord, rt: Runtime,
                 n_labeled: int, unlabeled_paths: list[str], cache: tuple[list[str], torch.Tensor] | None,
                 cache_rows: np.ndarray):
        self.config, self.members, self.weights, self.record, self.rt = config, members, weights, record, rt
        self.n_labeled, self.unlabeled_paths = n_labeled, unlabeled_paths
        self.cache = cache  # (ids, (n, K) probabilities) of the rows in `cache_rows`, mode "cached"
        self.by_row = None
        if cache is not None:  # row index of the training table → the teacher's probabilities
            self.by_row = torch.zeros(n_labeled + len(unlabeled_paths), cache[1].shape[1], device=rt.device)
            self.by_row[torch.as_tensor(cache_rows, device=rt.device)] = cache[1].to(rt.device)
        self.normalize = Normalizer(rt.device, torch.channels_last if rt.channels_last else torch.contiguous_format)

    def targets(self, images: torch.Tensor, index: torch.Tensor) -> TeacherTargets:
        """The teacher's view of one micro-batch: `images` the uint8 batch on the device as the
        student sees it (augmented), `index` its rows (on the host)."""
        labeled = index < self.n_labeled
        rows = None if bool(labeled.all()) else labeled.nonzero().flatten().to(self.rt.device)
        if self.config.weight == 0:
            probs = None
        elif self.by_row is not None:
            probs = self.by_row[index.to(self.rt.device)]
        else:
            probs = self.online(images)
        return TeacherTargets(probs, rows, self.config.weight)

    @torch.no_grad()
    def online(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K): the weighted mean of the members' probabilities on `images` (uint8, B×3×S×S),
        resized on the device to each member's input size, normalised, in the eval precision."""
        inputs = {}
        for size in sorted({m.img_size for m in self.members}):
            x = images if tuple(images.shape[-2:]) == (size, size) else F.interpolate(
                images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            inputs[size] = self.normalize(x)
        return combine(torch.stack([m.outputs(inputs[m.img_size], self.rt) for m in self.members]), self.weights)

    def write(self, run_dir: Path) -> None:
        """distill.json and, in mode "cached", the teachers' probabilities (rank 0)."""
        write_distill_record(run_dir / DISTILL_FILE, self.record)
        if self.cache is not None:
            ids, probs = self.cache
            write_safetensors(run_dir / DISTILL_CACHE_FILE, {"probs": probs.cpu().contiguous()},
                              {"format": CACHE_FORMAT, "fingerprint": self.record.fingerprint, "ids": json.dumps(ids)})


def train_items(data: PreparedData, distill: Distillation | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, labels, rows) a run trains on: train.csv's, then a distillation's unlabeled images
    (labels −1; the loss tells them by their row, never by the label)."""
    if distill is None:
        return data.table.paths, data.table.labels, data.train_rows
    n, start = len(distill.unlabeled_paths), distill.n_labeled
    labels = np.concatenate([data.table.labels, np.full((n, len(data.table.classes)), -1, np.int8)])
    rows = np.concatenate([data.train_rows, np.arange(start, start + n)])
    return data.table.paths + distill.unlabeled_paths, labels, rows


def distill_meta(distill: Distillation | None) -> dict[str, str]:
    """What a checkpoint's metadata records of the run's teachers (nothing without distillation)."""
    return {} if distill is None else distill.record.checkpoint_meta()


def distill_overrides(teachers: Sequence[str | Path] = (), weight: float | None = None, mode: str | None = None,
                      unlabeled: Sequence[str] | None = None) -> list[str]:
    """`aicoss distill`'s options as `--set` items of the [distill] table: each one given replaces
    the recipe's value (TOML values: JSON strings and lists of them are TOML too)."""
    given = {"teachers": [str(t) for t in teachers] or None, "weight": weight, "mode": mode,
             "unlabeled": None if unlabeled is None else list(unlabeled)}
    return [f"distill.{key}={json.dumps(value, ensure_ascii=False)}" for key, value in given.items() if value is not None]


def build_distillation(recipe, data: PreparedData, rt: Runtime, batch_size: int, resume: Resume | None,
                       notes: list[str], console=None) -> Distillation | None:
    """The run's teacher (None without a `[distill]` table): every check first (teachers, classes,
    val split, unlabeled images), then the members loaded, their val mAP and img/s measured (or
    read back from the resumed run's distill.json when the teacher is the same) and, in mode
    "cached", their probabilities on the clean training images (or the resumed run's cache).
    Progress bars go to `console` (None: none)."""
    if recipe.distill is None:
        return None
    with progress_display(console, enabled=console is not None, transient=True) as progress:
        return _build(recipe.distill, recipe.data.exif_transpose, data, rt, batch_size,
                      None if resume is None else resume.source, notes, progress)


def _build(cfg, exif_transpose: bool, data: PreparedData, rt: Runtime, batch_size: int, resume_dir: Path | None,
           notes: list[str], progress) -> Distillation:
    sources = [s for path in cfg.teachers for s in teacher_sources(path)]
    check_teachers([(str(s.path), member_meta(s.path)) for s in sources], data, exif_transpose)
    unl_ids, unl_paths = unlabeled_images(cfg.unlabeled, data, progress)
    weights = teacher_weights(sources)
    shas = [file_sha256(s.path) for s in sources]
    teacher = fingerprint(shas, weights, [s.tta or "none" for s in sources])  # the tta load_members gives
    record = _previous_record(resume_dir, teacher, len(data.val_rows), notes)
    n_labeled = len(data.table)
    cache_rows = np.concatenate([data.train_rows, np.arange(n_labeled, n_labeled + len(unl_ids))])
    cached = cfg.mode == "cached" and cfg.weight > 0
    ids = [data.table.ids[i] for i in data.train_rows] + unl_ids
    probs = _read_cache(resume_dir, teacher, ids) if cached and resume_dir is not None else None
    # a resumed cached run with its record and cache intact needs no teacher on the device
    members = [] if record is not None and probs is not None else load_members(sources, rt, progress=progress)
    if record is None:
        record = measure_teachers(members, weights, shas, teacher, data, rt, batch_size, progress)
    record = replace(record, weight=cfg.weight, mode=cfg.mode, unlabeled=list(cfg.unlabeled),
                     n_unlabeled=len(unl_ids))
    cache = None
    if cached:
        if probs is None:
            paths = [data.table.paths[i] for i in data.train_rows] + unl_paths
            probs = combine(forward(members, paths, rt, batch_size, progress=progress,
                                    what=f"teachers on {len(paths)} clean images"), weights)
        cache = (ids, probs)
    # cached: the members have done their work and leave the device
    return Distillation(cfg, members if cache is None else [], weights, record, rt, n_labeled, unl_paths, cache,
                        cache_rows)


def measure_teachers(members: list[Member], weights: np.ndarray, shas: list[str], teacher: str, data: PreparedData,
                     rt: Runtime, batch_size: int, progress=None) -> DistillRecord:
    """Every member's and the teacher's val mAP on the run's val split, and their img/s through the
    one forward loop (the teacher: all members on each decoded batch, as `aicoss ensemble` runs)."""
    paths = [data.table.paths[i] for i in data.val_rows]
    targets = data.table.labels[data.val_rows]
    forward(members, paths[:batch_size], rt, batch_size)  # warm-up: a model's first batches allocate

    def timed(group: list[Member], what: str) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        probs = forward(group, paths, rt, batch_size, progress=progress, what=what)
        return probs, len(paths) / max(time.perf_counter() - t0, 1e-9)

    found = []
    for k, member in enumerate(members):
        probs, speed = timed([member], f"teacher {k + 1}/{len(members)} on {len(paths)} val images")
        found.append(TeacherMember(member.path, shas[k], member.meta.arch, member.img_size, float(weights[k]),
                                   mean_average_precision(targets, probs[0].numpy()), speed))
    probs, speed = timed(members, f"the {len(members)} teachers together on {len(paths)} val images")
    return DistillRecord(members=found, val_map=mean_average_precision(targets, combine(probs, weights).numpy()),
                         img_per_s=speed, fingerprint=teacher, weight=0.0, mode="online", n_val=len(paths),
                         device=rt.describe().split(", ")[0], precision=rt.precision)


def _previous_record(resume_dir: Path | None, teacher: str, n_val: int, notes: list[str]) -> DistillRecord | None:
    """The resumed run's distill.json when it describes this teacher on this val split."""
    path = None if resume_dir is None else Path(resume_dir) / DISTILL_FILE
    if path is None or not path.is_file():
        return None
    record = load_distill_record(path)
    if record.fingerprint == teacher and record.n_val == n_val:
        return record
    notes.append(f"the teachers changed since this run started (fingerprint {record.fingerprint} → {teacher}): "
                 "the rest of the run learns from the new ones")
    return None


def _read_cache(resume_dir: Path, teacher: str, ids: list[str]) -> torch.Tensor | None:
    """The resumed run's cached probabilities of `ids`, when it holds them all for this teacher."""
    path = Path(resume_dir) / DISTILL_CACHE_FILE
    if not path.is_file():
        return None
    tensors, meta = read_safetensors(path)
    try:
        stored = json.loads(meta.get("ids", ""))
        probs = tensors["probs"]
    except (ValueError, KeyError):
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != teacher or len(stored) != len(probs):
        return None
    at = {img_id: i for i, img_id in enumerate(stored)}
    if not all(i in at for i in ids) or not bool(((probs >= 0) & (probs <= 1)).all()):  # NaN fails too
        return None
    return probs[torch.as_tensor([at[i] for i in ids], dtype=torch.long)].float()
