"""Seeing a run while it trains: `run.json`, a live `curves.png`, and the recipe's trackers
(TensorBoard, MLflow). `RunWatch` is the Trainer callback that does all three, on rank 0.

Nothing here may stop a run: a picture that cannot be drawn or a tracker that fails is a warning.
A missing tracker extra is the exception: it is an error at the start, before any compute.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aicoss_cli.base.files import write_text_atomic
from aicoss_cli.evaluation.metrics import average_precision_per_class
from aicoss_cli.recipe import recipe_to_toml
from aicoss_cli.results.layout import CURVES_FILE, EMA_COLUMN, METRICS_FILE, RECIPE_FILE, RUN_FILE, RUN_FORMAT
from aicoss_cli.results.runs import summarize_run


def run_summary(trainer, status: str) -> dict[str, Any]:
    """What `aicoss report` reads first: the run's recipe, progress, speed and state."""
    r, p = trainer.recipe, trainer.progress
    return {
        "format": RUN_FORMAT,
        "name": r.name,
        "arch": r.model.arch,
        "loss": r.loss.name,
        "epochs": r.optim.epochs,
        "epochs_done": len(p.rows),
        "best_epoch": p.best_epoch,
        "best_val_map": p.best_map if p.rows and math.isfinite(p.best_map) else None,
        "train_seconds": round(p.train_seconds, 3),
        "train_img_per_s": round(p.train_images / p.train_seconds, 2) if p.train_seconds > 0 else None,
        "eval_img_per_s": round(trainer.eval_img_per_s, 2) if trainer.eval_img_per_s else None,
        "device": trainer.rt.describe().split(", ")[0],
        "precision": trainer.rt.precision,
        "status": status,
    }


class RunWatch:
    """Trainer callback: after every epoch `run.json`, `curves.png` and the trackers' epoch; every
    log interval the trackers' training scalars; at the end the trackers' artifacts."""

    def __init__(self, warn):
        self.warn = warn
        self.trackers = None

    def on_run_start(self, trainer) -> None:
        from aicoss_cli.train.tracking import open_trackers, recipe_params

        names = trainer.recipe.runtime.loggers
        if names:
            resume = trainer.resume  # MLflow's default store lives in the train --out folder
            out = (resume.out or resume.source.parent.parent) if resume else trainer.out
            self.trackers = open_trackers(names, trainer.run_dir, out, recipe_to_toml(trainer.recipe),
                                          recipe_params(trainer.recipe), trainer.resume is not None, self.warn)

    def on_log(self, trainer, values: dict[str, float]) -> None:
        if self.trackers is not None:
            self.trackers.log_train(int(values["step"]), {k: values[k] for k in ("loss", "lr", "img_per_s")})

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        self._summary(trainer, "training")
        self._curves(trainer)
        if self.trackers is not None:
            aps = average_precision_per_class(trainer.val_targets, trainer.val_probs)
            per_class = {c: float(a) for c, a in zip(trainer.classes, aps) if not math.isnan(a)}
            values = {k: row[k] for k in ("train_loss", "val_loss", "val_map", EMA_COLUMN) if k in row}
            self.trackers.log_epoch(row["epoch"], trainer.progress.global_step, values, per_class_ap=per_class)

    def on_run_end(self, trainer, result) -> None:
        status = "finished" if result is not None else "stopped"
        self._summary(trainer, status)
        if self.trackers is not None:
            run = trainer.run_dir
            self.trackers.close(status, artifacts=[run / RECIPE_FILE, run / METRICS_FILE, run / CURVES_FILE])

    def _summary(self, trainer, status: str) -> None:
        try:
            write_text_atomic(trainer.run_dir / RUN_FILE, json.dumps(run_summary(trainer, status), indent=2) + "\n")
        except OSError as exc:
            self.warn(f"{trainer.run_dir / RUN_FILE}: not written ({exc.strerror or exc})")

    def _curves(self, trainer) -> None:
        if not trainer.progress.rows:
            return
        try:
            from aicoss_cli.results.pictures import draw_curves

            run = summarize_run(trainer.run_dir, trainer.recipe, trainer.progress.rows)  # the rows in memory
            draw_curves([run], trainer.run_dir / CURVES_FILE)
        except Exception as exc:  # a picture must never stop a run
            self.warn(f"curves.png not drawn ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
