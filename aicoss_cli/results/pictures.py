"""The pictures: training curves, per-class AP, the ensemble trade-off, and `aicoss tune`'s
trials.

Pictures are drawn on a bare matplotlib `Figure` (the Agg canvas, no pyplot and no global state),
so the Trainer can call `draw_curves` in its loop. Every picture carries a PNG text chunk
(`PNG_KEY`): a file that holds it may be redrawn, any other file is left alone. matplotlib is
imported inside the drawing functions; this module does not import torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import atomic_path
from aicoss_cli.results.cv import mean_std
from aicoss_cli.results.distillation import DistillRecord
from aicoss_cli.results.ensembles import EnsembleResult
from aicoss_cli.results.layout import EMA_COLUMN, KEEP_FILES
from aicoss_cli.results.runs import N_WEAKEST, ClassAP, Run, load_run

PNG_KEY = "aicoss-report"  # a PNG text chunk: a picture that holds it may be redrawn, any other file is left alone
MAX_CLASSES_DRAWN = 60
DPI = 100
COLOURS = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9")  # matplotlib's cycle without its grey
# the trade-off picture's point kinds (`tradeoff_points`): a new kind of point adds its marker here
MARKERS = {"run": dict(marker="o", s=50), "member": dict(marker="^", s=60), "ensemble": dict(marker="*", s=180)}


def new_figure(width_in: float, height_in: float):
    """A bare matplotlib Figure (no pyplot) of that size at `DPI`; UserError without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the report pictures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def plain_text(text: str, limit: int = 48) -> str:
    """A user's string drawn as is: `$` would start matplotlib mathtext."""
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("$", r"\$")


def save_png(fig, out_png: str | Path) -> Path:
    """Write `fig` atomically as a PNG that carries `PNG_KEY` (so a later report may redraw it)."""
    out_png = Path(out_png)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # emoji in a class name: drawn as a box
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={PNG_KEY: "1"})
    return out_png


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def draw_curves(run_dirs: Sequence[str | Path | Run], out_png: str | Path) -> Path:
    """curves.png: train loss, val loss and val mAP per epoch, one line per run (the EMA weights'
    val mAP dashed, when the run keeps an EMA), the best epoch starred at the score its checkpoint
    holds. The Trainer draws it after every epoch from the rows it holds (`runs.summarize_run`)."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    fig = new_figure(15, 4.8)
    axes = fig.subplots(1, 3)
    panels = (("train_loss", "train loss (per image)"), ("val_loss", "val loss (per image)"), ("val_map", "val mAP"))
    for ax, (key, title) in zip(axes, panels):
        for i, run in enumerate(runs):
            ax.plot(run.column("epoch"), _finite(run.column(key)), marker="o", markersize=3, color=f"C{i % 10}",
                    label=plain_text(run.label, 60))
            if key == "val_map":
                if EMA_COLUMN in run.rows[0]:
                    ax.plot(run.column("epoch"), _finite(run.column(EMA_COLUMN)), marker="x", markersize=3,
                            linestyle="--", color=f"C{i % 10}", label=plain_text(f"{run.label} (EMA weights)", 60))
                ax.plot([run.best_epoch], [run.best_val_map], marker="*", markersize=12, color=f"C{i % 10}",
                        linestyle="none")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mAP" if key == "val_map" else "loss")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[2].get_legend_handles_labels()  # the val mAP panel also has the EMA lines
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize="small")
    what = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(plain_text(f"training curves: {what} (★ best val mAP)", 120))
    return save_png(fig, out_png)


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
    fig = new_figure(11, 1.6 + 0.24 * len(order) * max(1.0, 0.6 * n_runs))
    ax = fig.subplots()
    height = 0.8 / n_runs
    y = np.arange(len(order))
    for r, run in enumerate(runs):
        values = np.nan_to_num(t.matrix[order, r], nan=0.0)
        ax.barh(y + (r - (n_runs - 1) / 2) * height, values, height=height, color=f"C{r % 10}",
                label=plain_text(run.label, 60))
    for row, c in enumerate(order):
        if c in t.weak:
            ax.axhspan(row - 0.5, row + 0.5, color="red", alpha=0.08, linewidth=0)
        if np.isnan(t.mean[c]):
            ax.text(0.01, row, "no positive in val", va="center", fontsize="x-small", color="grey")
    ax.set_yticks(y, [plain_text(t.classes[c], 40) for c in order])
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
    ax.set_title(plain_text(f"per-class AP: {what} (red: the {len(t.weak)} weakest{more})", 140))
    return save_png(fig, out_png)


def draw_fold_ap(cvs: Sequence[Any], out_png: str | Path) -> Path:
    """cv_per_class_ap.png: for each cross-validation folder (`results.cv.CvFolds`), every class's AP
    as the mean over its K folds (bar) ± their sample std (error bar) and over all out-of-fold rows
    (◆); classes sorted by the first folder's fold mean, weakest on top."""
    first = cvs[0]
    stats = [_fold_stats(cv, first.classes) for cv in cvs]
    mean0 = stats[0][0]
    order = [int(i) for i in np.argsort(np.where(np.isnan(mean0), np.inf, mean0), kind="stable")][:MAX_CLASSES_DRAWN]
    n = len(cvs)
    fig = new_figure(11, 1.6 + 0.24 * len(order) * max(1.0, 0.6 * n))
    ax = fig.subplots()
    height = 0.8 / n
    y = np.arange(len(order))
    for r, (cv, (mean, std, oof)) in enumerate(zip(cvs, stats)):
        pos = y + (r - (n - 1) / 2) * height
        label = f"{cv.plan.recipe.name} {cv.plan.parent.name}"
        ax.barh(pos, np.nan_to_num(mean[order]), height=height, color=f"C{r % 10}", alpha=0.8,
                xerr=np.nan_to_num(std[order]), error_kw={"elinewidth": 1, "capsize": 2},
                label=plain_text(f"{label}: mean of {cv.folds} folds ± std", 80))
        ax.plot(oof[order], pos, linestyle="none", marker="D", markersize=4, color="black" if n == 1 else f"C{r % 10}",
                markeredgecolor="black", label=plain_text(f"{label}: out-of-fold", 80))
    ax.set_yticks(y, [plain_text(first.classes[c], 40) for c in order])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("average precision on the held-out folds")
    ax.set_ylabel("class (weakest first)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    hidden = len(first.classes) - len(order)
    more = f"; {hidden} stronger classes not shown" if hidden else ""
    ax.set_title(plain_text(f"per-class AP over the folds (bar: mean, line: ±1 std, ◆: out-of-fold){more}", 140))
    return save_png(fig, out_png)


def _fold_stats(cv, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class of `classes`: the mean and sample std of the folds' AP (the folds with a positive),
    and the out-of-fold AP; NaN where the folder lacks the class."""
    fold_ap, oof = cv.fold_class_ap(), cv.oof_class_ap()
    mean, std, point = (np.full(len(classes), np.nan) for _ in range(3))
    for i, c in enumerate(classes):
        if c in cv.classes:
            j = cv.classes.index(c)
            scored = fold_ap[~np.isnan(fold_ap[:, j]), j]
            if len(scored):
                mean[i], std[i] = mean_std(scored)
            point[i] = oof[j]
    return mean, std, point


def draw_tradeoff(runs: Sequence[Run], ensembles: Sequence[EnsembleResult], out_png: str | Path,
                  distilled: Sequence[tuple[Run, DistillRecord]] = ()) -> Path:
    """ensemble_tradeoff.png: val mAP against total training time and against inference img/s, for
    single runs (●), ensembles (★) and, on the speed panel, their members (▲, in the ensemble's
    colour), with the Pareto front of each panel; a distilled run's teachers (each member ▲, their
    weighted mean ★) in the run's colour on the speed panel."""
    fig = new_figure(14, 5.6)
    axes = fig.subplots(1, 2)
    points_time, points_speed = tradeoff_points(runs, ensembles)
    points_speed += teacher_points(distilled, runs)
    panels = ((axes[0], points_time, "total training time [s]", "val mAP against training cost", "lower"),
              (axes[1], points_speed, "inference speed [img/s]", "val mAP against inference speed", "higher"))
    for ax, points, xlabel, title, better in panels:
        for p in points:
            style = MARKERS[p["kind"]]
            ax.scatter([p["x"]], [p["y"]], color=p["color"], zorder=3, label=plain_text(p["label"], 60), **style)
            ax.annotate(plain_text(p["label"], 36), (p["x"], p["y"]), textcoords="offset points", xytext=(6, 4),
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
    fig.suptitle("ensemble trade-off — single runs ●: validation speed during training; ensembles ★: "
                 "`aicoss ensemble`, images decoded and every member run;\nmembers ▲: each one's own forward in "
                 "that loop (decoding excluded); a distilled run's teachers in its colour")
    return save_png(fig, out_png)


def tradeoff_points(runs: Sequence[Run], ensembles: Sequence[EnsembleResult]) -> tuple[list[dict], list[dict]]:
    """The points of both panels: (training time, val mAP) and (img/s, val mAP); a run, an ensemble
    or a member that lacks a value is left out of that panel. Each point is a dict: kind (a key of
    `MARKERS`), label, x, y, color."""
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
        for i, m in enumerate(ens.members, start=1):
            if m.img_per_s is not None and m.val_map is not None:
                by_speed.append({"kind": "member", "label": f"member {i}: {m.arch} {m.img_size}px", "y": m.val_map,
                                 "x": m.img_per_s, "color": point["color"]})
    return by_time, by_speed


def teacher_points(distilled: Sequence[tuple[Run, DistillRecord]], runs: Sequence[Run]) -> list[dict]:
    """(img/s, val mAP) of each distilled run's teacher members and of the teacher, as its
    distill.json measured them on the run's val split, in the colour of the run."""
    points = []
    for run, record in distilled:
        color = f"C{runs.index(run) % 10}"
        for m in record.members:
            if m.val_map is not None:
                points.append({"kind": "member", "label": f"teacher {_member_label(m.path)}", "y": m.val_map,
                               "x": m.img_per_s, "color": color})
        if record.val_map is not None:
            points.append({"kind": "ensemble", "label": f"teachers of {run.label} ({len(record.members)} members)",
                           "y": record.val_map, "x": record.img_per_s, "color": color})
    return points


def _member_label(path: str) -> str:
    """A member's checkpoint as a legend names it: "<recipe name> <timestamp>" for a run folder's
    kept checkpoint (as runs are labelled), else the file name."""
    p = Path(path)
    return f"{p.parent.parent.name} {p.parent.name}" if p.name in KEEP_FILES.values() else p.name


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


def draw_trials(rows: Sequence[Any], out_png: str | Path, title: str) -> Path:
    """trials.png: best val mAP per trial (pruned trials at their last epoch, the best so far as a
    step line) and val mAP per epoch of every trial (pruned ones grey)."""
    fig = new_figure(13, 4.8)
    left, right = fig.subplots(1, 2)
    shown = [r for r in rows if r.value is not None and math.isfinite(r.value)]
    for state, style in (("complete", {"marker": "o", "color": "C0", "label": "complete"}),
                         ("pruned", {"marker": "x", "color": "0.55", "label": "pruned (last epoch)"})):
        pts = [r for r in shown if r.state == state]
        if pts:
            left.scatter([r.number for r in pts], [r.value for r in pts], s=36, zorder=3, **style)
    complete = sorted((r for r in shown if r.state == "complete"), key=lambda r: r.number)
    if complete:
        xs, ys, best = [], [], -math.inf
        for r in complete:
            best = max(best, r.value)
            xs.append(r.number)
            ys.append(best)
        left.step(xs, ys, where="post", color="C2", label="best so far")
        top = max(complete, key=lambda r: (r.value, -r.number))
        left.scatter([top.number], [top.value], marker="*", s=220, color="C3", zorder=4,
                     label=f"best: trial {top.number}")
    for r in shown:
        if r.baseline:
            left.annotate("recipe", (r.number, r.value), textcoords="offset points", xytext=(6, -12), fontsize="small")
    left.set_title("val mAP per trial")
    left.set_xlabel("trial")
    left.set_ylabel("val mAP")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.grid(alpha=0.3)
    if shown:
        left.legend(fontsize="small", loc="best")
    for r in rows:
        if not r.curve:
            continue
        epochs = list(range(1, len(r.curve) + 1))
        if r.state == "complete":
            right.plot(epochs, r.curve, marker="o", markersize=3, color=COLOURS[r.number % len(COLOURS)],
                       label=f"trial {r.number}")
        else:
            right.plot(epochs, r.curve, marker="x", markersize=4, color="0.6", linestyle="--")
    right.set_title("val mAP per epoch (grey: pruned or stopped)")
    right.set_xlabel("epoch")
    right.set_ylabel("val mAP")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.grid(alpha=0.3)
    if sum(r.state == "complete" and bool(r.curve) for r in rows) <= 10:
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize="small", loc="best")
    fig.suptitle(f"aicoss tune: {plain_text(title, 120)}")
    return save_png(fig, out_png)


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
