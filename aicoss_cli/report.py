"""Run summaries and pictures: training curves, per-class AP, and the ensemble trade-off.

A run folder (`runs/<recipe name>/<UTC timestamp>/`) is read as it is on disk, also while it is
still training: `metrics.csv` and `recipe.toml` always, `run.json` (written by the Trainer after
each epoch) when it is there, `val_scores.csv` for the per-class AP. Every file is untrusted: a
bad one is a `UserError` naming it. Pictures are drawn on a bare matplotlib `Figure` (the Agg
canvas, no pyplot and no global state), so the Trainer can call `draw_curves` in its loop.
matplotlib is imported inside the drawing functions; this module does not import torch.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aicoss_cli.errors import UserError

RUN_FORMAT = "aicoss-run/1"
ENSEMBLE_FORMAT = "aicoss-ensemble-result/1"
REPORT_FORMAT = "aicoss-report/1"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_map", "seconds")
PICTURES = {"curves": "curves.png", "per_class_ap": "per_class_ap.png", "ensemble_tradeoff": "ensemble_tradeoff.png"}
PNG_KEY = "aicoss-report"  # a PNG text chunk: a picture that holds it may be redrawn, any other file is left alone
N_WEAKEST = 5
MAX_CLASSES_DRAWN = 60
DPI = 100


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


# --------------------------------------------------------------------------- pictures


def _figure(width_in: float, height_in: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report pictures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _plain(text: str, limit: int = 48) -> str:
    """A user's string drawn as is: `$` would start matplotlib mathtext."""
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("$", r"\$")


def _save(fig, out_png: str | Path) -> Path:
    from aicoss_cli.checkpoint import atomic_path

    out_png = Path(out_png)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # emoji in a class name: drawn as a box
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={PNG_KEY: "1"})
    return out_png


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def draw_curves(run_dirs: Sequence[str | Path | Run], out_png: str | Path) -> Path:
    """curves.png: train loss, val loss and val mAP per epoch, one line per run (best epoch starred).

    The Trainer calls `draw_curves([run_dir], run_dir / "curves.png")` after every epoch.
    """
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    fig = _figure(15, 4.8)
    axes = fig.subplots(1, 3)
    panels = (("train_loss", "train loss (per image)"), ("val_loss", "val loss (per image)"), ("val_map", "val mAP"))
    for ax, (key, title) in zip(axes, panels):
        for i, run in enumerate(runs):
            ax.plot(run.column("epoch"), _finite(run.column(key)), marker="o", markersize=3, color=f"C{i % 10}",
                    label=_plain(run.label, 60))
            if key == "val_map":
                ax.plot([run.best_epoch], [run.best_val_map], marker="*", markersize=12, color=f"C{i % 10}",
                        linestyle="none")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mAP" if key == "val_map" else "loss")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 3), fontsize="small")
    what = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(_plain(f"training curves: {what} (★ best val mAP)", 120))
    return _save(fig, out_png)


@dataclass
class APTable:
    """Per-class AP of several runs side by side: the union of their classes (first run's order
    first), one column per run, the mean over runs, the classes weakest first (no AP last) and
    the five weakest by mean."""

    classes: list[str]
    matrix: np.ndarray  # (classes, runs), NaN where a run has no AP for the class
    mean: np.ndarray
    order: list[int]
    weak: set[int]


def ap_table(aps: Sequence[ClassAP]) -> APTable:
    classes: list[str] = []
    for a in aps:
        classes += [c for c in a.classes if c not in classes]
    matrix = np.full((len(classes), len(aps)), np.nan)
    index = {c: i for i, c in enumerate(classes)}
    for r, a in enumerate(aps):
        for c, value in zip(a.classes, a.ap):
            matrix[index[c], r] = value
    counts = (~np.isnan(matrix)).sum(axis=1)
    mean = np.where(counts > 0, np.nansum(matrix, axis=1) / np.maximum(counts, 1), np.nan)
    ranked = [int(i) for i in np.argsort(mean, kind="stable") if not np.isnan(mean[i])]
    order = ranked + [i for i in range(len(mean)) if np.isnan(mean[i])]
    return APTable(classes=classes, matrix=matrix, mean=mean, order=order, weak=set(ranked[:N_WEAKEST]))


def draw_per_class_ap(runs: Sequence[Run], aps: Sequence[ClassAP], out_png: str | Path) -> Path:
    """per_class_ap.png: the best checkpoint's val AP of every class, one bar per run, classes sorted
    by their mean AP over the runs (weakest on top), the five weakest marked in red."""
    t = ap_table(aps)
    order, hidden = t.order, 0
    if len(order) > MAX_CLASSES_DRAWN:
        hidden = len(order) - MAX_CLASSES_DRAWN
        order = order[:MAX_CLASSES_DRAWN]
    n_runs = len(runs)
    fig = _figure(11, 1.6 + 0.24 * len(order) * max(1.0, 0.6 * n_runs))
    ax = fig.subplots()
    height = 0.8 / n_runs
    y = np.arange(len(order))
    for r, run in enumerate(runs):
        values = np.nan_to_num(t.matrix[order, r], nan=0.0)
        ax.barh(y + (r - (n_runs - 1) / 2) * height, values, height=height, color=f"C{r % 10}",
                label=_plain(run.label, 60))
    for row, c in enumerate(order):
        if c in t.weak:
            ax.axhspan(row - 0.5, row + 0.5, color="red", alpha=0.08, linewidth=0)
        if np.isnan(t.mean[c]):
            ax.text(0.01, row, "no positive in val", va="center", fontsize="x-small", color="grey")
    ax.set_yticks(y, [_plain(t.classes[c], 40) for c in order])
    for tick, c in zip(ax.get_yticklabels(), order):
        if c in t.weak:
            tick.set_color("red")
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision on the val split (best checkpoint)")
    ax.set_ylabel("class (weakest first)")
    ax.grid(axis="x", alpha=0.3)
    if n_runs > 1:
        ax.legend(loc="lower right", fontsize="small")
    what = runs[0].label if n_runs == 1 else f"{n_runs} runs, sorted by mean AP"
    more = f"; {hidden} stronger classes not shown" if hidden else ""
    ax.set_title(_plain(f"per-class AP: {what} (red: the {len(t.weak)} weakest{more})", 140))
    return _save(fig, out_png)


def draw_tradeoff(runs: Sequence[Run], ensembles: Sequence[EnsembleResult], out_png: str | Path) -> Path:
    """ensemble_tradeoff.png: val mAP against total training time and against inference img/s, for
    single runs (●) and ensembles (★), with the Pareto front of each panel."""
    fig = _figure(14, 5.6)
    axes = fig.subplots(1, 2)
    points_time, points_speed = tradeoff_points(runs, ensembles)
    panels = ((axes[0], points_time, "total training time [s]", "val mAP against training cost", "lower"),
              (axes[1], points_speed, "inference speed [img/s]", "val mAP against inference speed", "higher"))
    for ax, points, xlabel, title, better in panels:
        for p in points:
            style = dict(marker="*", s=180) if p["kind"] == "ensemble" else dict(marker="o", s=50)
            ax.scatter([p["x"]], [p["y"]], color=p["color"], zorder=3, label=_plain(p["label"], 60), **style)
            ax.annotate(_plain(p["label"], 36), (p["x"], p["y"]), textcoords="offset points", xytext=(6, 4),
                        fontsize="x-small")
        front = pareto_front(points, lower_x_is_better=better == "lower")
        if len(front) > 1:
            ax.plot([p["x"] for p in front], [p["y"] for p in front], linestyle="--", color="grey", alpha=0.6,
                    zorder=2, label="Pareto front")
        xs = [p["x"] for p in points]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
        if not points:
            ax.text(0.5, 0.5, "no inference speed recorded\n(run.json eval_img_per_s or an --ensemble result)",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.set_xlabel(f"{xlabel} ({better} is better)")
        ax.set_ylabel("val mAP")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize="small")
    fig.suptitle("ensemble trade-off — single runs ●: validation speed during training; "
                 "ensembles ★: `aicoss ensemble`, images decoded and every member run")
    return _save(fig, out_png)


def tradeoff_points(runs: Sequence[Run], ensembles: Sequence[EnsembleResult]) -> tuple[list[dict], list[dict]]:
    """The points of both panels: (training time, val mAP) and (img/s, val mAP); a run or an
    ensemble that lacks a value is left out of that panel."""
    by_time, by_speed = [], []
    for i, run in enumerate(runs):
        point = {"kind": "run", "label": run.label, "y": run.best_val_map, "color": f"C{i % 10}"}
        if math.isfinite(run.best_val_map):
            by_time.append({**point, "x": run.train_seconds})
            if run.eval_img_per_s:
                by_speed.append({**point, "x": run.eval_img_per_s})
    for j, ens in enumerate(ensembles):
        if ens.val_map is None:
            continue
        point = {"kind": "ensemble", "label": ens.label, "y": ens.val_map, "color": f"C{(len(runs) + j) % 10}"}
        if ens.train_seconds is not None:
            by_time.append({**point, "x": ens.train_seconds})
        by_speed.append({**point, "x": ens.img_per_s})
    return by_time, by_speed


def pareto_front(points: Sequence[dict], lower_x_is_better: bool) -> list[dict]:
    """The points no other point beats on both axes (higher mAP and a better x), sorted by x."""
    sign = 1 if lower_x_is_better else -1
    ordered = sorted(points, key=lambda p: (sign * p["x"], -p["y"]))
    front, best = [], -math.inf
    for p in ordered:
        if p["y"] > best:
            front.append(p)
            best = p["y"]
    return sorted(front, key=lambda p: p["x"])


# --------------------------------------------------------------------------- the whole report


@dataclass
class Report:
    runs: list[Run]
    class_aps: list[ClassAP | None]
    ensembles: list[EnsembleResult]
    pictures: dict[str, Path]
    notes: list[str]


def default_out(run_dirs: Sequence[Path]) -> Path:
    """The run's own folder for one run, else ./report."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")


def check_targets(out: Path) -> dict[str, Path]:
    """The picture paths under `out`; a file there that this command did not write is never replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder (it is a file)")
    targets = {key: out / name for key, name in PICTURES.items()}
    for path in targets.values():
        if path.exists() and not is_report_picture(path):
            raise UserError(f"{path}: exists and was not written by aicoss report; choose another --out")
    return targets


def is_report_picture(path: Path) -> bool:
    """A PNG holding this module's text chunk (read without decoding the image)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if not head.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    return PNG_KEY.encode() + b"\x00" in head


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 ensembles: Sequence[str | Path] = (), data: str | Path | None = None) -> Report:
    """Read every run and ensemble result (all checks first), then draw the three pictures into
    `out` (default: `default_out`). With no run named, the ensembles' member runs are reported."""
    results = [load_ensemble(p) for p in ensembles]
    notes: list[str] = []
    if not run_dirs:
        member_dirs = [m.run_dir for e in results for m in e.members if m.run_dir is not None]
        run_dirs = list(dict.fromkeys(member_dirs))
        if not run_dirs:
            raise UserError("name at least one run folder (runs/<recipe name>/<timestamp>), or an --ensemble "
                            "result whose members' run folders exist")
    runs = [load_run(r) for r in dict.fromkeys(Path(r) for r in run_dirs)]
    if data is not None and not Path(data).is_dir():
        raise UserError(f"{data}: --data folder not found")
    class_aps: list[ClassAP | None] = []
    for run in runs:
        root = Path(data) if data is not None else Path(run.data_root)
        if not (run.run_dir / "val_scores.csv").is_file():
            class_aps.append(None)
            notes.append(f"{run.label}: no per-class AP (no val_scores.csv in {run.run_dir})")
            continue
        if not (root / "train.csv").is_file():
            if data is not None:
                raise UserError(f"{root}: no train.csv in the --data folder")
            class_aps.append(None)
            notes.append(f"{run.label}: no per-class AP ({root / 'train.csv'} not found); "
                         "pass --data DIR with the data it trained on")
            continue
        class_aps.append(class_ap(run, root))
        if abs(class_aps[-1].val_map - run.best_val_map) > 2e-3:
            notes.append(f"{run.label}: the per-class AP average {class_aps[-1].val_map:.4f} differs from the best "
                         f"val mAP {run.best_val_map:.4f}: is --data the data this run trained on?")
    for r in results:
        if r.val_map is None:
            notes.append(f"{r.path}: no val mAP recorded; the ensemble is left out of the trade-off picture")
        elif r.train_seconds is None:
            notes.append(f"{r.path}: a member's run folder is not found, so the ensemble's training time is "
                         "unknown; it is left out of the training-time panel")
    if any(run.source == "metrics.csv" for run in runs):
        notes.append("runs without run.json: training time = the sum of metrics.csv seconds (validation "
                     "included); no img/s recorded")

    out = Path(out) if out is not None else default_out([r.run_dir for r in runs])
    targets = check_targets(out)
    pictures = {"curves": draw_curves(runs, targets["curves"])}
    with_ap = [(run, a) for run, a in zip(runs, class_aps) if a is not None]
    if with_ap:
        pictures["per_class_ap"] = draw_per_class_ap([r for r, _ in with_ap], [a for _, a in with_ap],
                                                     targets["per_class_ap"])
    pictures["ensemble_tradeoff"] = draw_tradeoff(runs, results, targets["ensemble_tradeoff"])
    return Report(runs=runs, class_aps=class_aps, ensembles=results, pictures=pictures, notes=notes)


def report_json(report: Report) -> dict[str, Any]:
    """The report as JSON-able data (non-finite numbers as null)."""
    runs = []
    for run, a in zip(report.runs, report.class_aps):
        runs.append({
            "run_dir": str(run.run_dir), "label": run.label, "name": run.name, "arch": run.arch, "loss": run.loss,
            "epochs": run.epochs, "epochs_done": run.epochs_done, "best_epoch": run.best_epoch,
            "best_val_map": run.best_val_map, "train_seconds": run.train_seconds,
            "train_img_per_s": run.train_img_per_s, "eval_img_per_s": run.eval_img_per_s, "device": run.device,
            "precision": run.precision, "status": run.status, "source": run.source,
            "metrics": [{k: (int(v) if k == "epoch" else v) for k, v in row.items()} for row in run.rows],
            "per_class_ap": None if a is None else {
                "classes": a.classes, "ap": [float(v) for v in a.ap], "positives": [int(v) for v in a.positives],
                "n_val": a.n_val, "weakest": [a.classes[i] for i in weakest(a.ap)]},
        })
    ensembles = [{
        "path": str(e.path), "label": e.label, "val_map": e.val_map, "equal_val_map": e.equal_val_map,
        "weighting": e.weighting, "n_val": e.n_val, "n_test": e.n_test, "img_per_s": e.img_per_s,
        "seconds": e.seconds, "device": e.device, "precision": e.precision, "train_seconds": e.train_seconds,
        "members": [{"path": m.path, "arch": m.arch, "img_size": m.img_size, "weight": m.weight,
                     "val_map": m.val_map, "run_dir": None if m.run_dir is None else str(m.run_dir),
                     "train_seconds": m.train_seconds} for m in e.members],
    } for e in report.ensembles]
    data = {"format": REPORT_FORMAT, "runs": runs, "ensembles": ensembles,
            "pictures": {k: str(v) for k, v in report.pictures.items()}, "notes": report.notes}
    return _json_safe(data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value

