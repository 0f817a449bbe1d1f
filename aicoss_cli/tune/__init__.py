"""Hyper-parameter search with Optuna: the search space and every trial's recipe (space), and the
study that trains them (study).

    from aicoss_cli.tune import TrialRecipes, load_space, tune
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "space": ["Param", "Space", "TrialRecipes", "TuneSettings", "default_space", "load_space"],
    "study": ["TuneResult", "tune"],
})
