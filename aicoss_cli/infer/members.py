"""Where an ensemble's members come from and what they must share: the ENSEMBLE.toml spec, the runs
under `runs/` (each run's kept checkpoint), cross-validation folders (a member = its K fold
checkpoints averaged), the checks that members share classes and val split, and that val split
rebuilt from a checkpoint's metadata.

Members must share the class list (names and order) and the validation split (the checkpoint's
`split` metadata, verified against train.csv with `data.splits.split_fingerprint`), so their val
scores can be compared and combined; CV folders must share their folds, and are compared on their
out-of-fold predictions (every training image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.splits import describe_split, split_from_record
from aicoss_cli.data.tables import read_train
from aicoss_cli.evaluation.halves import fold_halves
from aicoss_cli.infer.forward import MemberSource
from aicoss_cli.models.checkpoint import CheckpointMeta, read_meta
from aicoss_cli.recipe import read_toml
from aicoss_cli.results.cv import CvFolds, load_cv
from aicoss_cli.results.layout import BEST_FILE, LAST_FILE, is_cv_dir, is_run_dir, kept_file, run_keep


@dataclass
class ValSplit:
    """The val images a checkpoint was validated on, in the order of train.csv."""

    ids: list[str]
    paths: list[str]
    targets: np.ndarray  # (n, K) int8 in {-1, 0, 1}

    def __len__(self) -> int:
        return len(self.ids)


def val_split(meta: CheckpointMeta, root: Path, source: str) -> ValSplit:
    """The val split recorded in a checkpoint's metadata, rebuilt from the train.csv under `root`
    and verified (same classes, same rows, the val ids hash to the recorded fingerprint)."""
    table = read_train(root)
    meta.check_classes(table.classes, source, Path(root) / "train.csv")
    _, rows = split_from_record(meta.split, table, source)
    return ValSplit([table.ids[i] for i in rows], [table.paths[i] for i in rows], table.labels[rows])


def other_data(meta: CheckpointMeta, root: Path, source: str) -> str | None:
    """A warning when the train.csv under `root` gives another val split than the checkpoint
    recorded: not the data it was trained on (e.g. a relative `[data] root` found from another
    folder). None when it matches, or when it cannot be told (no train.csv, no split recorded)."""
    if not meta.split.get("val_fingerprint") or not (Path(root) / "train.csv").is_file():
        return None
    try:
        val_split(meta, root, source)
    except UserError as exc:
        reason = str(exc).removeprefix(f"{source}: ").split("; pass the --data")[0]
        return (f"the data in {root} gives another train/val split than {source} recorded ({reason}): is it the "
                "data the checkpoint was trained on? (a relative [data] root is found from the current folder); "
                "the test predictions are written anyway")
    return None


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
    folders = (p for p in runs_dir.glob("*/*") if is_run_dir(p))
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
        raise UserError(f"{runs_dir}: no run with a readable kept checkpoint ({BEST_FILE}, or {LAST_FILE} where the recipe keeps the last){why}; train one with `aicoss train RECIPE`")
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


def check_members(metas: Sequence[tuple[str, CheckpointMeta]], same_split: bool = True) -> bool:
    """Same class list (names and order) and, with `same_split`, the same val split for every member;
    or folds of one cross-validation (the same `folds_fingerprint`), which share none: False then."""
    ref_src, ref = metas[0]
    folds = {meta.split.get("folds_fingerprint") for _, meta in metas}
    one_cv = len(folds) == 1 and None not in folds and len({meta.split.get("fold") for _, meta in metas}) > 1
    for src, meta in metas[1:]:
        if meta.classes != ref.classes:
            if len(meta.classes) != len(ref.classes):
                detail = f"{len(meta.classes)} classes vs {len(ref.classes)}"
            else:
                i = next(i for i, (a, b) in enumerate(zip(meta.classes, ref.classes)) if a != b)
                detail = f"class {i + 1} is {meta.classes[i]!r} vs {ref.classes[i]!r}"
            raise UserError(f"{src}: its class list differs from {ref_src}'s ({detail}); ensemble members must be "
                            "trained on the same classes in the same order")
        if meta.exif_transpose != ref.exif_transpose:
            raise UserError(f"{src}: its recipe's [data] exif_transpose is {str(meta.exif_transpose).lower()}, "
                            f"{ref_src}'s {str(ref.exif_transpose).lower()}; ensemble members must see the same pixels")
        a, b = ref.split.get("val_fingerprint"), meta.split.get("val_fingerprint")
        if same_split and not one_cv and a != b:
            raise UserError(
                f"{src}: validated on another split than {ref_src} ({describe_split(meta.split)} vs "
                f"{describe_split(ref.split)}); ensemble members must share the val split (same [data] split, "
                "val_fraction and split_seed on the same train.csv)")
    return not one_cv


# --------------------------------------------------------------------------- cross-validation folders


@dataclass
class CvMembers:
    """Members that are cross-validation folders (`aicoss train --folds K`), all of the same folds:
    member p is the mean of its K fold checkpoints, and its val scores are its out-of-fold
    predictions, so weights and thresholds fit on every training image."""

    sources: list[MemberSource]  # the folders, with their weight and tta
    cvs: list[CvFolds]

    @property
    def checkpoints(self) -> list[MemberSource]:
        """Every fold checkpoint, member after member, with its member's tta."""
        return [MemberSource(path, s.weight, s.tta) for s, cv in zip(self.sources, self.cvs) for path in cv.checkpoints]

    @property
    def targets(self) -> np.ndarray:
        return self.cvs[0].targets

    @property
    def oof(self) -> np.ndarray:
        """(members, N, C): each member's out-of-fold probabilities, in train.csv's row order."""
        return np.stack([cv.oof for cv in self.cvs])

    def halves(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The held-out check's (fit, score) rows: whole folds on each side (`fold_halves`)."""
        return fold_halves(self.cvs[0].fold_of, seed)

    def per_checkpoint(self, weights: np.ndarray) -> np.ndarray:
        """Member weights spread over the checkpoints: each member's weight split evenly over its folds."""
        return np.concatenate([np.full(cv.folds, w / cv.folds) for w, cv in zip(weights, self.cvs)])


def cv_members(sources: Sequence[MemberSource], data: Path | None) -> CvMembers | None:
    """None unless a member is a cross-validation folder; then every member must be one, finished,
    with the same folds of the same train.csv (the fingerprint of each fold's val ids)."""
    folders = [s for s in sources if is_cv_dir(s.path)]
    if not folders:
        return None
    plain = next((s for s in sources if not is_cv_dir(s.path)), None)
    if plain is not None:
        raise UserError(f"{plain.path}: a single checkpoint and cross-validation folders ({folders[0].path}) share no "
                        "validation images, so they cannot be scored or weighed together; ensemble CV folders "
                        "together, or checkpoints together")
    cvs = [load_cv(s.path, data) for s in sources]
    ref_src, ref = sources[0], cvs[0]
    for src, cv in zip(sources[1:], cvs[1:]):
        if cv.folds != ref.folds:
            raise UserError(f"{src.path}: {cv.folds} folds but {ref_src.path} has {ref.folds}; ensemble CV folders "
                            "of the same [data] folds and split_seed")
        k = next((k for k in range(ref.folds) if cv.fingerprints[k] != ref.fingerprints[k]), None)
        if k is not None or cv.ids != ref.ids:
            k = 0 if k is None else k
            raise UserError(f"{src.path}: its folds differ from {ref_src.path}'s (fold {k}: fingerprint "
                            f"{cv.fingerprints[k]} vs {ref.fingerprints[k]}); ensemble CV folders of the same [data] "
                            "folds and split_seed on the same train.csv")
    return CvMembers(list(sources), cvs)
