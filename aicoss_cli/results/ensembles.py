"""The ensemble result: what `aicoss ensemble` writes beside its submission (`<out stem>.json`) and
`aicoss report --ensemble` reads back. One dataclass, one writer (`to_json`), one checked reader
(`load_ensemble`): the format lives here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import write_text_atomic
from aicoss_cli.results.layout import ENSEMBLE_FORMAT, has_epochs
from aicoss_cli.results.runs import checked_field, load_run, read_members_json, show

WEIGHTINGS = ("equal", "auto", "spec")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class EnsembleMember:
    """One member as the result file records it; `run_dir` and `train_seconds` are found when the
    file is read (the checkpoint's folder, when it is a run folder). `img_per_s`: test images per
    second of the member's own forward in the ensemble's loop (decoding excluded; None in files
    written before it was recorded)."""

    path: str
    arch: str
    img_size: int
    weight: float
    val_map: float | None
    img_per_s: float | None = None
    run_dir: Path | None = None
    train_seconds: float | None = None


@dataclass
class EnsembleResult:
    """An `aicoss ensemble` result: its members, the ensemble's val mAP, its speed and where it ran.
    `per_class`, `per_class_csv` and `labels` are written for the user and not read back."""

    submission: str
    members: list[EnsembleMember]
    val_map: float | None
    equal_val_map: float | None
    weighting: str
    n_val: int
    n_test: int
    img_per_s: float
    seconds: float
    device: str
    precision: str
    per_class: list[dict] | None = None
    per_class_csv: str | None = None
    labels: dict | None = None
    path: Path | None = None  # the file it was read from

    @property
    def label(self) -> str:
        stem = self.path.stem if self.path is not None else Path(self.submission).stem
        return f"{stem} ({len(self.members)} members)"

    @property
    def train_seconds(self) -> float | None:
        """Total training time of the members' runs (each run counted once); None if one is unknown."""
        seen: dict[Path, float | None] = {}
        for m in self.members:
            key = m.run_dir.resolve() if m.run_dir is not None else Path(m.path)
            seen[key] = m.train_seconds
        values = list(seen.values())
        return None if not values or any(v is None for v in values) else float(sum(values))

    def to_json(self) -> dict[str, Any]:
        return json_ready({
            "format": ENSEMBLE_FORMAT, "submission": self.submission,
            "members": [{"path": m.path, "arch": m.arch, "img_size": m.img_size, "weight": m.weight,
                         "val_map": m.val_map, "img_per_s": None if m.img_per_s is None else round(m.img_per_s, 3)}
                        for m in self.members],
            "val_map": self.val_map, "equal_val_map": self.equal_val_map, "weighting": self.weighting,
            "n_val": self.n_val, "n_test": self.n_test, "img_per_s": round(self.img_per_s, 3),
            "seconds": round(self.seconds, 3), "device": self.device, "precision": self.precision,
            "per_class": self.per_class or None, "per_class_csv": self.per_class_csv, "labels": self.labels,
        })


def result_path_for(out: str | Path) -> Path:
    """The result file of the submission `out`: `<out stem>.json` beside it."""
    return Path(out).with_suffix(".json")


def write_ensemble_result(path: str | Path, result: EnsembleResult) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(result.to_json(), indent=2) + "\n")
    return path


def load_ensemble(path: str | Path) -> EnsembleResult:
    """An `aicoss ensemble` result JSON, every field checked (an untrusted file). A member's run is
    the folder of its checkpoint (relative paths: from the JSON's folder, else the current one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ensemble result not found (aicoss ensemble writes it beside its CSV as <stem>.json)")
    data, members_raw = read_members_json(path, ENSEMBLE_FORMAT, "ensemble result")

    def get(key: str, kind: str, where: dict = data, prefix: str = ""):
        return checked_field(where, key, kind, path, prefix)

    members = []
    for i, m in enumerate(members_raw):
        prefix = f"members[{i}]."
        member_path = get("path", "str", m, prefix)
        run_dir = _member_run_dir(path, member_path)
        member = EnsembleMember(path=member_path, arch=get("arch", "str", m, prefix),
                                img_size=get("img_size", "int", m, prefix), weight=get("weight", "nonneg", m, prefix),
                                val_map=get("val_map", "unit?", m, prefix),
                                img_per_s=get("img_per_s", "pos?", m, prefix), run_dir=run_dir)
        if run_dir is not None:
            member.train_seconds = load_run(run_dir).train_seconds
        members.append(member)
    weighting = get("weighting", "str")
    if weighting not in WEIGHTINGS:
        raise UserError(f"{path}: 'weighting' must be \"equal\", \"auto\" or \"spec\" (got {show(weighting)})")
    precision = get("precision", "str")
    if precision not in PRECISIONS:
        raise UserError(f"{path}: 'precision' must be \"fp32\", \"fp16\" or \"bf16\" (got {show(precision)})")
    return EnsembleResult(
        submission=get("submission", "str"), members=members, val_map=get("val_map", "unit?"),
        equal_val_map=get("equal_val_map", "unit?"), weighting=weighting, n_val=get("n_val", "int"),
        n_test=get("n_test", "int"), img_per_s=get("img_per_s", "pos"), seconds=get("seconds", "nonneg"),
        device=get("device", "str"), precision=precision, path=path,
    )


def _member_run_dir(result: Path, member_path: str) -> Path | None:
    p = Path(member_path)
    for candidate in ([p] if p.is_absolute() else [result.parent / p, p]):
        if has_epochs(candidate.parent):
            return candidate.parent
    return None
