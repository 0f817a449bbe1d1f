"""Training: the `Trainer` (the one training loop) and what it is built from: the data it checks
first (prepare), the optimizer step, schedule and EMA (step), what each epoch keeps (keep), the
resumable state (state), the run folder and its stops (run_dir), live summaries and curves
(watch), experiment trackers (tracking), the class prior of P-ASL (prior), and K-fold
cross-validation around the Trainer (cv).

    from aicoss_cli.train import Trainer
    result = Trainer(recipe, out="runs").run()   # recipe: a resolved `aicoss_cli.recipe.Recipe`
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cv": ["run_cv", "start_cv", "summarize"],
    "prepare": ["PreparedData", "prepare_data"],
    "prior": ["run_prior"],
    "state": ["Resume", "TrainProgress", "resolve_resume"],
    "trainer": ["Callback", "RunResult", "Trainer", "train"],
})
