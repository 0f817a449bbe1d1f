"""What a run folder and an ensemble result hold, read back as they are on disk.

A run folder (`runs/<recipe name>/<UTC timestamp>/`) is read also while it is still training:
`metrics.csv` and `recipe.toml` always, `run.json` (written by the Trainer after each epoch) when
it is there, `val_scores.csv` for the per-class AP. Every file is untrusted: a bad one is a
`UserError` naming it. This module imports neither torch nor matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aicoss_cli.errors import UserError

RUN_FORMAT = "aicoss-run/1"
ENSEMBLE_FORMAT = "aicoss-ensemble-result/1"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_map", "seconds")
N_WEAKEST = 5


# --------------------------------------------------------------------------- what a run holds


@dataclass
class Run:
    """One run folder, summarised. Times in seconds; `None` where the run did not record it."""

    run_dir: Path
    label: str  # "<recipe name> <timestamp>": what legends and tables call the run
    name: str
    arch: str
    loss: str
    epochs: int  # planned
    epochs_done: int
    best_epoch: int
    best_val_map: float
    train_seconds: float
    train_img_per_s: float | None
    eval_img_per_s: float | None
    device: str | None
    precision: str
    status: str  # training | finished | stopped (run.json), or finished | incomplete (from metrics.csv)
    source: str  # "run.json" or "metrics.csv": where the summary numbers come from
    data_root: str
    val_fraction: float
    rows: list[dict[str, float]] = field(default_factory=list)  # metrics.csv, one dict per epoch

    def column(self, key: str) -> np.ndarray:
        return np.array([row.get(key, math.nan) for row in self.rows], dtype=np.float64)


@dataclass
class ClassAP:
    """Per-class AP of a run's best checkpoint on its own val split."""

    classes: list[str]
    ap: np.ndarray  # NaN: no positive in val
    positives: np.ndarray
    n_val: int

    @property
    def val_map(self) -> float:
        valid = ~np.isnan(self.ap)
        return float(self.ap[valid].mean()) if valid.any() else math.nan


@dataclass
class EnsembleMember:
    path: str
    arch: str
    img_size: int
    weight: float
    val_map: float | None
    run_dir: Path | None  # the checkpoint's folder, when it is a run folder
    train_seconds: float | None


@dataclass
class EnsembleResult:
    """An `aicoss ensemble` result file (`<out stem>.json`), checked."""

    path: Path
    label: str
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

    @property
    def train_seconds(self) -> float | None:
        """Total training time of the members' runs (each run counted once); None if one is unknown."""
        seen: dict[Path, float | None] = {}
        for m in self.members:
            key = m.run_dir.resolve() if m.run_dir is not None else Path(m.path)
            seen[key] = m.train_seconds
        values = list(seen.values())
        return None if not values or any(v is None for v in values) else float(sum(values))


# --------------------------------------------------------------------------- reading a run


def load_run(run_dir: str | Path) -> Run:
    """Summarise a run folder from metrics.csv and recipe.toml, and run.json when present.

    UserError (one line, naming the file) for a folder that is not a run, a run with no finished
    epoch, or a damaged file.
    """
    from aicoss_cli.recipe import recipe_from_toml

    run_dir = Path(run_dir)
    recipe_path, metrics_path = run_dir / "recipe.toml", run_dir / "metrics.csv"
    if not run_dir.is_dir() or not recipe_path.is_file():
        raise UserError(f"{run_dir}: not an aicoss run folder (it needs recipe.toml and metrics.csv); "
                        "pass runs/<recipe name>/<timestamp>")
    if not metrics_path.is_file():
        raise UserError(f"{run_dir}: no finished epoch yet (no metrics.csv); report it after its first epoch")
    try:
        recipe_text = recipe_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{recipe_path}: cannot be read ({exc})") from None
    recipe = recipe_from_toml(recipe_text, str(recipe_path))
    rows = read_metrics(metrics_path)
    if not rows:
        raise UserError(f"{run_dir}: no finished epoch yet (metrics.csv has no rows); report it after its first epoch")
    info = read_run_json(run_dir / "run.json")

    val_map = np.array([r["val_map"] for r in rows])
    finite = np.where(np.isfinite(val_map), val_map, -np.inf)
    best = int(np.argmax(finite))  # the first of equal maxima, as the Trainer keeps the first best
    run = Run(
        run_dir=run_dir, label=_run_label(recipe.name, run_dir), name=recipe.name, arch=recipe.model.arch,
        loss=recipe.loss.name, epochs=recipe.optim.epochs, epochs_done=int(rows[-1]["epoch"]),
        best_epoch=int(rows[best]["epoch"]), best_val_map=float(val_map[best]),
        train_seconds=float(sum(r["seconds"] for r in rows)), train_img_per_s=None, eval_img_per_s=None,
        device=recipe.runtime.device, precision=recipe.runtime.precision,
        status="finished" if int(rows[-1]["epoch"]) >= recipe.optim.epochs else "incomplete",
        source="metrics.csv", data_root=recipe.data.root, val_fraction=recipe.data.val_fraction, rows=rows,
    )
    if info is not None:  # what metrics.csv cannot say; its numbers stay the ones metrics.csv holds
        run.source = "run.json"
        for key in ("train_img_per_s", "eval_img_per_s", "device", "precision", "status"):
            if key in info:
                setattr(run, key, info[key])
    return run


def _run_label(name: str, run_dir: Path) -> str:
    return name if run_dir.name == name else f"{name} {run_dir.name}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows as floats (extra columns such as val_map_ema are kept); NaN is allowed (a
    diverged epoch), anything else that is not a number is an error naming the row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from None
    if not table:
        return []
    header = [h.strip() for h in table[0]]
    missing = [c for c in METRIC_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r} (expected {','.join(METRIC_COLUMNS)})")
    rows = []
    for number, cells in enumerate(table[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{path}: row {number} has {len(cells)} values for {len(header)} columns")
        row = {}
        for key, text in zip(header, cells):
            try:
                value = float(text)
            except ValueError:
                raise UserError(f"{path}: row {number}, column {key!r}: {text[:40]!r} is not a number") from None
            if math.isinf(value) or (math.isnan(value) and key in ("epoch", "seconds")):
                raise UserError(f"{path}: row {number}, column {key!r}: {text[:40]!r} is not a finite number")
            row[key] = value
        if row["epoch"] < 1 or row["epoch"] != int(row["epoch"]) or row["seconds"] < 0:
            raise UserError(f"{path}: row {number}: epoch must be a whole number ≥ 1 and seconds ≥ 0")
        if rows and row["epoch"] <= rows[-1]["epoch"]:
            raise UserError(f"{path}: row {number}: epoch {int(row['epoch'])} does not follow epoch "
                            f"{int(rows[-1]['epoch'])}")
        rows.append(row)
    return rows


_RUN_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "arch": (str,), "loss": (str,), "device": (str,), "precision": (str,), "status": (str,),
    "epochs": (int,), "epochs_done": (int,), "best_epoch": (int,),
    "best_val_map": (int, float), "train_seconds": (int, float), "train_img_per_s": (int, float),
    "eval_img_per_s": (int, float, type(None)),
}


def read_run_json(path: Path) -> dict[str, Any] | None:
    """The Trainer's run.json, checked field by field; None when the file is absent."""
    if not path.is_file():
        return None
    data = _read_json(path)
    if data.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: not an aicoss run summary (expected \"format\": \"{RUN_FORMAT}\")")
    out: dict[str, Any] = {}
    for key, types in _RUN_JSON_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise UserError(f"{path}: {key!r} has the wrong type (got {_show(value)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{path}: {key!r} must be a finite number (got {_show(value)})")
        if isinstance(value, (int, float)) and value < 0:
            raise UserError(f"{path}: {key!r} must not be negative (got {_show(value)})")
        out[key] = float(value) if key in ("best_val_map", "train_seconds", "train_img_per_s") else value
    if "best_val_map" in out and out["best_val_map"] > 1:
        raise UserError(f"{path}: 'best_val_map' must be in [0, 1] (got {_show(data['best_val_map'])})")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot be read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) < 50 else text[:47] + "..."


# --------------------------------------------------------------------------- per-class AP


def class_ap(run: Run, data: str | Path | None = None) -> ClassAP:
    """Per-class AP of the run's best checkpoint, from its val_scores.csv and the labels of those
    img_ids in train.csv (data root: `data`, else the recipe's `[data] root`). No inference."""
    from aicoss_cli.data import read_train
    from aicoss_cli.metrics import average_precision_per_class

    scores_path = run.run_dir / "val_scores.csv"
    if not scores_path.is_file():
        raise UserError(f"{scores_path}: not found (the Trainer writes it with the best checkpoint)")
    classes, ids, scores = read_scores(scores_path)
    table = read_train(data if data is not None else run.data_root)
    unknown = [c for c in classes if c not in table.classes]
    if unknown:
        raise UserError(f"{scores_path}: class {unknown[0]!r} is not a column of {table.root / 'train.csv'}; "
                        "pass --data with the data this run trained on")
    row_of = {img_id: i for i, img_id in enumerate(table.ids)}
    missing = [(n, i) for n, i in enumerate(ids, start=2) if i not in row_of]
    if missing:
        raise UserError(f"{scores_path}: row {missing[0][0]}: img_id {missing[0][1]!r} is not in "
                        f"{table.root / 'train.csv'}; pass --data with the data this run trained on")
    rows = np.array([row_of[i] for i in ids])
    cols = np.array([table.classes.index(c) for c in classes])
    targets = table.labels[np.ix_(rows, cols)]
    return ClassAP(classes=classes, ap=average_precision_per_class(targets, scores),
                   positives=(targets > 0).sum(axis=0), n_val=len(ids))


def read_scores(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, img_ids, probabilities) of a scores CSV; every value a probability in [0, 1]."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot be read as CSV ({exc})") from None
    if not table or not table[0] or table[0][0] != "img_id" or len(table[0]) < 2:
        raise UserError(f"{path}: expected a header img_id,<class 1>,...,<class K>")
    classes = table[0][1:]
    if len(set(classes)) != len(classes):
        raise UserError(f"{path}: a class column appears twice")
    body = [r for r in table[1:] if r]
    if not body:
        raise UserError(f"{path}: no rows")
    values = np.empty((len(body), len(classes)))
    for n, cells in enumerate(body):
        if len(cells) != len(classes) + 1:
            raise UserError(f"{path}: row {n + 2} has {len(cells)} values for {len(classes) + 1} columns")
        try:
            values[n] = [float(c) for c in cells[1:]]
        except ValueError:
            raise UserError(f"{path}: row {n + 2}: a probability is not a number") from None
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        n, j = (int(v[0]) for v in np.nonzero(bad))
        raise UserError(f"{path}: row {n + 2}, column {classes[j]!r}: {body[n][j + 1]!r} is not a probability in [0, 1]")
    ids = [r[0] for r in body]
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: an img_id appears twice")
    return classes, ids, values


def weakest(ap: np.ndarray, n: int = N_WEAKEST) -> list[int]:
    """Indices of the n lowest APs (NaN, a class without a positive, is never among them)."""
    order = [int(i) for i in np.argsort(ap, kind="stable") if not np.isnan(ap[i])]
    return order[:n]


# --------------------------------------------------------------------------- ensemble results


def load_ensemble(path: str | Path) -> EnsembleResult:
    """An `aicoss ensemble` result JSON, every field checked (an untrusted file). A member's run is
    the folder of its checkpoint (relative paths: from the JSON's folder, else the current one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ensemble result not found (aicoss ensemble writes it beside its CSV as <stem>.json)")
    data = _read_json(path)
    if data.get("format") != ENSEMBLE_FORMAT:
        raise UserError(f"{path}: not an aicoss ensemble result (expected \"format\": \"{ENSEMBLE_FORMAT}\")")

    def get(key, kind, where=data, prefix=""):
        value = where.get(key)
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "pos": _number(value) and value > 0,
            "nonneg": _number(value) and value >= 0,
            "map": value is None or (_number(value) and 0 <= value <= 1),
        }[kind]
        if not ok:
            expected = {"str": "a string", "int": "a whole number ≥ 0", "pos": "a finite number > 0",
                        "nonneg": "a finite number ≥ 0", "map": "null or a number in [0, 1]"}[kind]
            raise UserError(f"{path}: '{prefix}{key}' must be {expected} (got {_show(value)})")
        return float(value) if kind in ("pos", "nonneg") or (kind == "map" and value is not None) else value

    members_raw = data.get("members")
    if not isinstance(members_raw, list) or not members_raw:
        raise UserError(f"{path}: 'members' must be a non-empty list")
    members = []
    for i, m in enumerate(members_raw):
        prefix = f"members[{i}]."
        if not isinstance(m, dict):
            raise UserError(f"{path}: members[{i}] must be an object")
        member_path = get("path", "str", m, prefix)
        run_dir = _member_run_dir(path, member_path)
        member = EnsembleMember(path=member_path, arch=get("arch", "str", m, prefix),
                                img_size=get("img_size", "int", m, prefix), weight=get("weight", "nonneg", m, prefix),
                                val_map=get("val_map", "map", m, prefix), run_dir=run_dir, train_seconds=None)
        if run_dir is not None:
            member.train_seconds = load_run(run_dir).train_seconds
        members.append(member)
    weighting = get("weighting", "str")
    if weighting not in ("equal", "auto", "spec"):
        raise UserError(f"{path}: 'weighting' must be \"equal\", \"auto\" or \"spec\" (got {_show(weighting)})")
    precision = get("precision", "str")
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"{path}: 'precision' must be \"fp32\", \"fp16\" or \"bf16\" (got {_show(precision)})")
    return EnsembleResult(
        path=path, label=f"{path.stem} ({len(members)} members)", submission=get("submission", "str"),
        members=members, val_map=get("val_map", "map"), equal_val_map=get("equal_val_map", "map"),
        weighting=weighting, n_val=get("n_val", "int"), n_test=get("n_test", "int"),
        img_per_s=get("img_per_s", "pos"), seconds=get("seconds", "nonneg"), device=get("device", "str"),
        precision=precision,
    )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _member_run_dir(result: Path, member_path: str) -> Path | None:
    p = Path(member_path)
    for candidate in ([p] if p.is_absolute() else [result.parent / p, p]):
        folder = candidate.parent
        if (folder / "recipe.toml").is_file() and (folder / "metrics.csv").is_file():
            return folder
    return None
