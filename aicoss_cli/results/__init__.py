"""Results: what a run folder holds (layout: every file name and column, the best epoch), runs,
ensemble results and a distilled run's teachers read back (runs, ensembles, distillation), and
`aicoss report`'s pictures and summary.

No torch: a report reads files only.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "distillation": ["DistillRecord", "gain_recovered", "load_distill_record"],
    "ensembles": ["EnsembleResult", "load_ensemble"],
    "layout": ["best_row", "is_run_dir", "kept_file", "score"],
    "pictures": ["draw_curves", "draw_per_class_ap", "draw_tradeoff"],
    "report": ["build_report", "report_json"],
    "runs": ["Run", "class_ap", "load_run", "summarize_run"],
})
