"""`aicoss report`: read runs and ensemble results (every check first), draw the pictures into
one folder, and the summary as JSON. A file in that folder that `report` did not write is never
replaced. This module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from aicoss_cli.base.checks import json_ready
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import check_writable_folder
from aicoss_cli.results.cv import CvFolds, fold_missing, load_cv, mean_std, read_plan
from aicoss_cli.results.distillation import DistillRecord, gain_recovered, load_distill_record
from aicoss_cli.results.ensembles import EnsembleResult, load_ensemble
from aicoss_cli.results.errors import (
    ErrorAnalysis,
    ErrorOptions,
    analyse,
    csv_scores,
    error_files,
    error_json,
    error_source,
    is_suspects_csv,
    prediction_source,
    write_suspects,
)
from aicoss_cli.results.html import HTML_FILE, is_report_page, write_report_html
from aicoss_cli.results.layout import DISTILL_FILE, METRICS_FILE, OOF_FILE, VAL_SCORES_FILE, has_epochs, is_cv_dir
from aicoss_cli.results.pictures import (
    draw_curves,
    draw_fold_ap,
    draw_per_class_ap,
    draw_tradeoff,
    is_report_picture,
)
from aicoss_cli.results.runs import ClassAP, Run, class_ap, load_run, weakest

REPORT_FORMAT = "aicoss-report/1"
PICTURES = {"curves": "curves.png", "per_class_ap": "per_class_ap.png", "ensemble_tradeoff": "ensemble_tradeoff.png",
            "cv_per_class_ap": "cv_per_class_ap.png"}


# --------------------------------------------------------------------------- pictures


# --------------------------------------------------------------------------- the whole report


@dataclass
class Report:
    runs: list[Run]
    class_aps: list[ClassAP | None]
    ensembles: list[EnsembleResult]
    pictures: dict[str, Path]
    notes: list[str]
    analysis: ErrorAnalysis | None = None
    files: dict[str, Path] = field(default_factory=dict)  # suspect_labels.csv, report.html
    cvs: list[CvFolds] = field(default_factory=list)  # the cross-validation folders named, when finished
    distilled: list[tuple[Run, DistillRecord]] = field(default_factory=list)  # runs with a distill.json


def default_out(run_dirs: Sequence[Path]) -> Path:
    """The run's own folder for one run, else ./report."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")


def check_targets(out: Path, extra: dict[str, str] | None = None) -> dict[str, Path]:
    """The paths of the pictures (and `extra` files) under `out`, a folder that can be written; a
    file there that this command did not write is never replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out must be a folder (it is a file)")
    check_writable_folder(out)
    targets = {key: out / name for key, name in {**PICTURES, **(extra or {})}.items()}
    ours = {".png": is_report_picture, ".html": is_report_page, ".csv": is_suspects_csv}
    for path in targets.values():
        if path.exists() and not ours[path.suffix](path):
            raise UserError(f"{path}: exists and was not written by aicoss report; choose another --out")
    return targets


def build_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 ensembles: Sequence[str | Path] = (), data: str | Path | None = None,
                 errors: ErrorOptions | None = None) -> Report:
    """Read every run and ensemble result (all checks first), then draw the three pictures into
    `out` (default: `default_out`). With no run named, the ensembles' member runs are reported.
    Where labels are known (one run, or one prediction CSV with `errors.labels`), the error
    analysis too; report.html always."""
    errors = errors or ErrorOptions()
    results = [load_ensemble(p) for p in ensembles]
    notes: list[str] = []
    predictions, run_dirs = prediction_source(run_dirs)
    if not run_dirs:
        member_dirs = [m.run_dir for e in results for m in e.members if m.run_dir is not None]
        run_dirs = list(dict.fromkeys(member_dirs))
        if not run_dirs and predictions is None:
            raise UserError("name at least one run folder (runs/<recipe name>/<timestamp>), or an --ensemble "
                            "result whose members' run folders exist")
    if data is not None and not Path(data).is_dir():
        raise UserError(f"{data}: --data folder not found")
    named = list(dict.fromkeys(Path(r) for r in run_dirs))  # a CV folder named alone is the default --out
    cvs, run_dirs = expand_cv_dirs(run_dirs, data, notes)
    runs = [load_run(r) for r in dict.fromkeys(Path(r) for r in run_dirs)]
    distilled = [(run, load_distill_record(run.run_dir / DISTILL_FILE)) for run in runs
                 if (run.run_dir / DISTILL_FILE).is_file()]
    out = Path(out) if out is not None else default_out(named if predictions is None else [])
    check_targets(out)  # where the pictures go is checked before any of them is computed
    class_aps: list[ClassAP | None] = []
    for run in runs:
        root = Path(data) if data is not None else Path(run.data_root)
        if not (run.run_dir / VAL_SCORES_FILE).is_file():
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
    if any(run.source == METRICS_FILE for run in runs):
        notes.append("runs without run.json: training time = the sum of metrics.csv seconds (validation "
                     "included); no img/s recorded")

    if predictions is None and len(named) == 1 and len(cvs) == 1 and errors.labels is None and errors.split == "val":
        # one finished CV folder: its out-of-fold rows (every training image) against train.csv
        source = csv_scores(cvs[0].plan.parent / OOF_FILE, cvs[0].root / "train.csv", cvs[0].root)
    else:
        source = error_source(runs, predictions, errors, data)
    analysis = analyse(source, errors) if source is not None else None
    targets = check_targets(out, {**(error_files(analysis) if analysis else {}), "html": HTML_FILE})
    pictures: dict[str, Path] = {}
    if runs:
        pictures["curves"] = draw_curves(runs, targets["curves"])
    with_ap = [(run, a) for run, a in zip(runs, class_aps) if a is not None]
    if with_ap:
        pictures["per_class_ap"] = draw_per_class_ap([r for r, _ in with_ap], [a for _, a in with_ap],
                                                     targets["per_class_ap"])
    if runs or results:
        pictures["ensemble_tradeoff"] = draw_tradeoff(runs, results, targets["ensemble_tradeoff"], distilled)
    if cvs:
        pictures["cv_per_class_ap"] = draw_fold_ap(cvs, targets["cv_per_class_ap"])
    files: dict[str, Path] = {}
    if analysis is not None:
        from aicoss_cli.results.gallery import draw_error_analysis

        pictures.update(draw_error_analysis(analysis, targets))
        files["suspect_labels"] = write_suspects(targets["suspect_labels"], analysis)
        notes += analysis.notes
    files["html"] = write_report_html(targets["html"], runs=runs, ensembles=results, pictures=pictures,
                                      analysis=analysis, suspects_csv=files.get("suspect_labels"), notes=notes)
    return Report(runs=runs, class_aps=class_aps, ensembles=results, pictures=pictures, notes=notes,
                  analysis=analysis, files=files, cvs=cvs, distilled=distilled)


def expand_cv_dirs(run_dirs: Sequence[str | Path], data: str | Path | None,
                   notes: list[str]) -> tuple[list[CvFolds], list[Path]]:
    """Each cross-validation folder named stands for its fold runs (those with a finished epoch: the
    K curves in one picture); a finished one is also read back whole (`load_cv`) for the per-class
    AP over its folds. The other folders pass through."""
    cvs, expanded = [], []
    for folder in map(Path, run_dirs):
        if not is_cv_dir(folder):
            expanded.append(folder)
            continue
        plan = read_plan(folder)
        folds = [plan.fold_dir(k) for k in range(plan.folds) if has_epochs(plan.fold_dir(k))]
        if not folds:
            raise UserError(f"{folder}: no fold has finished an epoch yet; report it after the first")
        expanded += folds
        unfinished = [k for k in range(plan.folds) if fold_missing(plan.fold_dir(k))]
        if unfinished:
            notes.append(f"{folder}: folds {', '.join(map(str, unfinished))} of {plan.folds} are not finished: no "
                         "per-class AP over the folds yet")
        else:
            cvs.append(load_cv(folder, data))
    return cvs, expanded


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
                     "train_seconds": m.train_seconds, "img_per_s": m.img_per_s} for m in e.members],
    } for e in report.ensembles]
    distilled = []
    for run, record in report.distilled:
        best = record.best_member
        distilled.append({"run_dir": str(run.run_dir), "teachers": record.to_json(),
                          "student": {"val_map": run.best_val_map, "img_per_s": run.eval_img_per_s},
                          "gain_recovered": gain_recovered(best.val_map if best else None, record.val_map,
                                                           run.best_val_map)})
    cvs = [{"parent": str(cv.plan.parent), "folds": cv.folds, "fold_val_map": cv.fold_maps,
            **dict(zip(("mean_val_map", "std_val_map"), mean_std(cv.fold_maps))), "oof_map": cv.oof_map}
           for cv in report.cvs]
    data = {"format": REPORT_FORMAT, "runs": runs, "ensembles": ensembles, "cv": cvs, "distilled": distilled,
            "pictures": {k: str(v) for k, v in report.pictures.items()}, "notes": report.notes,
            "error_analysis": None if report.analysis is None else error_json(report.analysis),
            "files": {k: str(v) for k, v in report.files.items()}}
    return json_ready(data)


