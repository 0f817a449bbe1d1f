"""A distilled run's teachers as its `distill.json` records them: written by `train.distill` when
the run starts, read back by `aicoss report` to show the student beside its teachers. Every
member's file, sha256, weight, val mAP and img/s, and the ensemble's, measured with the one forward
loop on the run's val split. One dataclass, one writer (`to_json`), one checked reader
(`load_distill_record`); this module imports no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import write_text_atomic
from aicoss_cli.results.layout import DISTILL_FORMAT
from aicoss_cli.results.runs import checked_field, read_members_json, show

MODES = ("online", "cached")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class TeacherMember:
    path: str
    sha256: str
    arch: str
    img_size: int
    weight: float  # normalised: the members' weights sum to 1
    val_map: float | None
    img_per_s: float


@dataclass
class DistillRecord:
    """The teachers of a distilled run and the settings it distils with."""

    members: list[TeacherMember]
    val_map: float | None  # of the teacher (the weighted mean) on the run's val split
    img_per_s: float  # of the teacher: every member run on each decoded batch, as `aicoss ensemble` runs them
    fingerprint: str  # sha256 of the members' files, weights and TTA: what the teacher is
    weight: float
    mode: str
    unlabeled: list[str] = field(default_factory=list)
    n_unlabeled: int = 0
    n_val: int = 0
    device: str = ""
    precision: str = "fp32"
    path: Path | None = None  # the file it was read from

    @property
    def best_member(self) -> TeacherMember | None:
        scored = [m for m in self.members if m.val_map is not None]
        return max(scored, key=lambda m: m.val_map) if scored else None

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "format": DISTILL_FORMAT,
            "members": [{"path": m.path, "sha256": m.sha256, "arch": m.arch, "img_size": m.img_size,
                         "weight": m.weight, "val_map": m.val_map, "img_per_s": round(m.img_per_s, 3)}
                        for m in self.members],
            "val_map": self.val_map, "img_per_s": round(self.img_per_s, 3), "fingerprint": self.fingerprint,
            "weight": self.weight, "mode": self.mode, "unlabeled": self.unlabeled, "n_unlabeled": self.n_unlabeled,
            "n_val": self.n_val, "device": self.device, "precision": self.precision,
        })

    def checkpoint_meta(self) -> dict[str, str]:
        """What a student checkpoint's metadata records of its teachers (key "distill", JSON)."""
        return {"distill": json.dumps({
            "teachers": [{"file": Path(m.path).name, "sha256": m.sha256, "weight": m.weight} for m in self.members],
            "ensemble_val_map": self.val_map, "fingerprint": self.fingerprint, "weight": self.weight,
            "mode": self.mode})}


def gain_recovered(best_member: float | None, ensemble: float | None, student: float | None) -> float | None:
    """The fraction of the ensemble's gain over its best member that the student recovers:
    (student − best member) / (ensemble − best member); None when the ensemble gains nothing."""
    values = (best_member, ensemble, student)
    if any(v is None or not math.isfinite(v) for v in values) or ensemble <= best_member:
        return None
    return (student - best_member) / (ensemble - best_member)


def write_distill_record(path: str | Path, record: DistillRecord) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(record.to_json(), indent=2) + "\n")
    return path


def load_distill_record(path: str | Path) -> DistillRecord:
    """A run's distill.json, every field checked (an untrusted file)."""
    path = Path(path)
    data, members_raw = read_members_json(path, DISTILL_FORMAT, "distillation record")

    def get(key: str, kind: str, where: dict = data, prefix: str = ""):
        return checked_field(where, key, kind, path, prefix)

    members = []
    for i, m in enumerate(members_raw):
        prefix = f"members[{i}]."
        members.append(TeacherMember(
            path=get("path", "str", m, prefix), sha256=get("sha256", "str", m, prefix),
            arch=get("arch", "str", m, prefix), img_size=get("img_size", "int", m, prefix),
            weight=get("weight", "unit", m, prefix), val_map=get("val_map", "unit?", m, prefix),
            img_per_s=get("img_per_s", "pos", m, prefix)))
    for key, allowed in (("mode", MODES), ("precision", PRECISIONS)):
        if data.get(key) not in allowed:
            raise UserError(f"{path}: '{key}' must be {' or '.join(map(json.dumps, allowed))} "
                            f"(got {show(data.get(key))})")
    return DistillRecord(
        members=members, val_map=get("val_map", "unit?"), img_per_s=get("img_per_s", "pos"),
        fingerprint=get("fingerprint", "str"), weight=get("weight", "unit"), mode=data["mode"],
        unlabeled=get("unlabeled", "names"), n_unlabeled=get("n_unlabeled", "int"), n_val=get("n_val", "int"),
        device=get("device", "str"), precision=data["precision"], path=path)
