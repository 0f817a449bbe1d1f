"""Evaluation: macro mAP and the scores at thresholds (metrics), per-class thresholds and the 0/1
label files (thresholds), the per-class table and `aicoss score` (score), held-out halves.

numpy only: `aicoss score` imports no torch.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "halves": ["fold_halves", "halves"],
    "metrics": ["average_precision_per_class", "mean_average_precision", "skipped_classes", "threshold_scores"],
    "score": ["per_class_rows", "score_files", "score_report"],
    "thresholds": ["Thresholds", "fit_thresholds", "held_out_threshold_gain", "parse_threshold_spec",
                   "resolve_thresholds"],
})
