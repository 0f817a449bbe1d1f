"""What a run keeps after each epoch: metrics.csv, last.safetensors, best.safetensors on a better
score, val_scores.csv of the kept checkpoint, the k best epochs' files, and when to stop early.

An epoch's score and the best epoch are `results.layout`'s (`score`, `best_row`): the better val
mAP of its raw and EMA weights; a NaN score never beats a number, so it never decides what is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from aicoss_cli.base.files import write_text_atomic
from aicoss_cli.data.submission import write_scores_csv
from aicoss_cli.models.checkpoint import save_checkpoint
from aicoss_cli.results.layout import (
    BEST_FILE,
    EMA_COLUMN,
    LAST_FILE,
    METRIC_COLUMNS,
    METRICS_FILE,
    VAL_SCORES_FILE,
    epoch_file,
    score,
)


def is_better(row: dict[str, Any], best_epoch: int, best_map: float) -> bool:
    """A new best: the first epoch always (so a run always has a best checkpoint), then only a
    strictly higher score."""
    return best_epoch == 0 or score(row) > best_map


def top_epochs(rows: Sequence[dict[str, Any]], k: int) -> list[int]:
    """The k epochs with the highest scores (the earlier epoch first on a tie)."""
    ranked = sorted(rows, key=lambda r: (-score(r), r["epoch"]))
    return sorted(int(r["epoch"]) for r in ranked[:k])


def prune_epoch_files(run_dir: Path, keep: Sequence[int], epochs: int) -> None:
    """Remove the epoch checkpoints that fell out of the top k."""
    wanted = {epoch_file(e, epochs) for e in keep}
    for path in run_dir.glob("epoch*.safetensors"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)


def stop_early(rows: Sequence[dict[str, Any]], best_epoch: int, patience: int | None) -> bool:
    """`patience` epochs in a row without a better score than the best epoch's."""
    return patience is not None and bool(rows) and int(rows[-1]["epoch"]) - best_epoch >= patience


def keep_epoch(run_dir: Path, recipe, progress, weights: dict, meta, val_ids: Sequence[str], val_probs,
               ema: bool) -> bool:
    """The files of the epoch `progress.rows[-1]`: metrics.csv, last.safetensors, best.safetensors (and
    the best in `progress`) on a better score, val_scores.csv of the kept checkpoint (`[runtime]
    keep`), and the top-k epoch checkpoints (`keep_top`). `weights` are the better of the epoch's raw
    and EMA weights. True when the epoch is the new best."""
    row, r = progress.rows[-1], recipe
    write_metrics(run_dir / METRICS_FILE, progress.rows, ema=ema)
    save_checkpoint(run_dir / LAST_FILE, weights, meta)
    best = is_better(row, progress.best_epoch, progress.best_map)
    if best:
        progress.best_map, progress.best_epoch = score(row), row["epoch"]
        save_checkpoint(run_dir / BEST_FILE, weights, meta)
    if best or r.runtime.keep == "last":
        write_scores_csv(run_dir / VAL_SCORES_FILE, val_ids, meta.classes, val_probs)
    if r.runtime.keep_top:
        top = top_epochs(progress.rows, r.runtime.keep_top)
        if row["epoch"] in top:
            save_checkpoint(run_dir / epoch_file(row["epoch"], r.optim.epochs), weights, meta)
        prune_epoch_files(run_dir, top, r.optim.epochs)
    return best


def write_metrics(path: Path, rows: Sequence[dict[str, Any]], ema: bool) -> None:
    """metrics.csv: one row per epoch; with an EMA, a val_map_ema column after val_map."""
    columns = list(METRIC_COLUMNS)
    if ema:
        columns.insert(columns.index("val_map") + 1, EMA_COLUMN)
    lines = [",".join(columns)] + [",".join(_fmt(row.get(c)) for c in columns) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if value == value else "nan"
    return "" if value is None else str(value)
