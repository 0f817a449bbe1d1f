"""Results: what a run folder holds (layout: every file name and column, the best epoch), runs,
cross-validation folders, ensemble results and a distilled run's teachers read back (runs, cv,
ensembles, distillation), and `aicoss report`'s pictures, summary, error analysis (errors, gallery)
and page (html).

No torch, except the decoder that `errors.read_thumbnails` imports when a report shows images.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cv": ["CvFolds", "load_cv", "read_plan"],
    "distillation": ["DistillRecord", "gain_recovered", "load_distill_record"],
    "ensembles": ["EnsembleResult", "load_ensemble"],
    "errors": ["ErrorAnalysis", "ErrorOptions", "LabeledScores", "analyse", "csv_scores", "run_scores"],
    "gallery": ["draw_error_analysis"],
    "html": ["write_report_html"],
    "layout": ["best_row", "is_cv_dir", "is_run_dir", "kept_file", "score"],
    "pictures": ["draw_curves", "draw_per_class_ap", "draw_tradeoff"],
    "report": ["build_report", "report_json"],
    "runs": ["Run", "class_ap", "load_run", "summarize_run"],
})
