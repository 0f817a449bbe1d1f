"""K-fold cross-validation against the single train/val split, on one data set with test labels.

  split: `aicoss train RECIPE` (default recipes/starter.toml: a 10 % val split, split_seed 78);
  CV:    `aicoss train RECIPE --folds K` (default 5; the same recipe, split_seed seeds the folds).

Prints the val mAP of the single split against the CV's mean ± std over the folds and its
out-of-fold (OOF) mAP; the test mAP of the single-split model against the K folds' average
(the CV folder's submission.csv); and the test macro F1 of both at 0.5, at per-class thresholds
fitted on the single split's val images, and at thresholds fitted on the OOF predictions of every
training image (`evaluation.thresholds.fit_thresholds`, scored by `evaluation.score.score_report`).
The data root must hold test_labels.csv (the demo and bench/photo_data.py write it).

    python bench/photo_data.py data/photos --n-train 1500 --n-test 500
    python bench/cv_vs_split.py --data data/photos
    python bench/cv_vs_split.py --data data/demo --folds 5 --set runtime.seed=7 --json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import ROOT, printer, scratch_folder


def aligned(path: Path, ids: list[str], what) -> np.ndarray:
    """The rows of a scores or labels CSV in the order of `ids`."""
    table = what(path)
    row = {i: r for r, i in enumerate(table.ids)}
    return table.values[[row[i] for i in ids]]


def macro_f1(classes, truth, probs, thresholds) -> float:
    from aicoss_cli.evaluation.score import score_report

    return float(score_report(classes, truth, probs, thresholds)["macro"]["f1"])


def measure(recipe, folds: int, out: Path, say) -> dict:
    from aicoss_cli.base.console import err
    from aicoss_cli.data.submission import read_labels_csv, read_probabilities_csv
    from aicoss_cli.data.tables import read_test, read_train
    from aicoss_cli.evaluation.metrics import mean_average_precision
    from aicoss_cli.evaluation.thresholds import fit_thresholds
    from aicoss_cli.results.cv import mean_std
    from aicoss_cli.train.cv import fold_recipe, run_cv, start_cv
    from aicoss_cli.train.trainer import Trainer

    root = Path(recipe.data.root)
    table, test = read_train(root), read_test(root, read_train(root).classes)
    truth = aligned(root / "test_labels.csv", test.ids, read_labels_csv)

    say(f"single split: {recipe.name} on {root}")
    t0 = time.perf_counter()
    single = Trainer(recipe, out / "split", console=err).run()
    split_seconds = time.perf_counter() - t0
    val = read_probabilities_csv(single.run_dir / "val_scores.csv")
    row = {i: r for r, i in enumerate(table.ids)}
    val_targets = table.labels[[row[i] for i in val.ids]]
    single_test = aligned(single.run_dir / "submission.csv", test.ids, read_probabilities_csv)

    say(f"{folds}-fold cross-validation")
    cv_recipe = fold_recipe(recipe, None)
    cv_recipe.data.folds = folds
    t0 = time.perf_counter()
    run = run_cv(start_cv(cv_recipe, out / "cv", console=err), console=err)
    cv_seconds = time.perf_counter() - t0
    cv = run.summary.cv
    cv_test = aligned(cv.plan.parent / "submission.csv", test.ids, read_probabilities_csv)

    split_t = fit_thresholds(val_targets, val.values).thresholds
    oof_t = fit_thresholds(cv.targets, cv.oof).thresholds
    mean, std = mean_std(cv.fold_maps)
    classes = table.classes
    return {
        "n_train": len(table), "n_val_split": len(val.ids), "n_test": len(test), "classes": len(classes),
        "split": {"val_map": single.best_map, "test_map": mean_average_precision(truth, single_test),
                  "test_f1_at_0.5": macro_f1(classes, truth, single_test, 0.5),
                  "test_f1_split_thresholds": macro_f1(classes, truth, single_test, split_t),
                  "test_f1_oof_thresholds": macro_f1(classes, truth, single_test, oof_t),
                  "seconds": split_seconds},
        "cv": {"folds": folds, "fold_val_map": cv.fold_maps, "mean_val_map": mean, "std_val_map": std,
               "oof_map": cv.oof_map, "test_map": mean_average_precision(truth, cv_test),
               "test_f1_at_0.5": macro_f1(classes, truth, cv_test, 0.5),
               "test_f1_split_thresholds": macro_f1(classes, truth, cv_test, split_t),
               "test_f1_oof_thresholds": macro_f1(classes, truth, cv_test, oof_t),
               "seconds": cv_seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="data root with test_labels.csv")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "starter.toml")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.data / "test_labels.csv").is_file():
        raise SystemExit(f"{args.data}: no test_labels.csv; build the data with `aicoss demo-data` or "
                         "bench/photo_data.py")
    say = printer(args.json)

    from aicoss_cli.recipe import load_recipe, resolve_recipe

    recipe = resolve_recipe(load_recipe(args.recipe, args.overrides), data_root=args.data)
    if args.out is not None:
        result = measure(recipe, args.folds, args.out, say)
    else:
        with scratch_folder("cv_vs_split.") as tmp:
            result = measure(recipe, args.folds, tmp, say)
    o = recipe.optim
    result["setting"] = {"data": str(args.data), "recipe": str(args.recipe), "overrides": args.overrides,
                         "epochs": o.epochs, "img_size": recipe.model.img_size, "batch_size": o.batch_size,
                         "seed": recipe.runtime.seed, "split_seed": recipe.data.split_seed,
                         "val_fraction": recipe.data.val_fraction, "threads": __import__("torch").get_num_threads(),
                         "load_avg": os.getloadavg()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    from aicoss_cli.base.console import out as console

    s, c = result["split"], result["cv"]
    k = c["folds"]
    table = Table(title=f"{args.data}: {result['n_train']} train / {result['n_test']} test images, "
                  f"{result['classes']} classes; {args.recipe.name}, {o.epochs} epochs, {recipe.model.img_size} px, "
                  f"seed {recipe.runtime.seed}", title_justify="left")
    table.add_column("")
    table.add_column(f"single split ({result['n_val_split']} val images)", justify="right")
    table.add_column(f"{k}-fold CV", justify="right")
    table.add_row("val mAP", f"{s['val_map']:.4f}", f"{c['mean_val_map']:.4f} ± {c['std_val_map']:.4f} (folds)")
    table.add_row("out-of-fold mAP (every train image)", "-", f"{c['oof_map']:.4f}")
    table.add_row("test mAP", f"{s['test_map']:.4f} (the model)", f"{c['test_map']:.4f} ({k} folds' mean)")
    table.add_row("test macro F1 at 0.5", f"{s['test_f1_at_0.5']:.4f}", f"{c['test_f1_at_0.5']:.4f}")
    table.add_row("test macro F1, thresholds fit on the val split", f"{s['test_f1_split_thresholds']:.4f}",
                  f"{c['test_f1_split_thresholds']:.4f}")
    table.add_row("test macro F1, thresholds fit on out-of-fold", f"{s['test_f1_oof_thresholds']:.4f}",
                  f"{c['test_f1_oof_thresholds']:.4f}")
    table.add_row("seconds (training + evaluation)", f"{s['seconds']:.0f}", f"{c['seconds']:.0f}")
    console.print(table)
    load = ", ".join(f"{v:.1f}" for v in result["setting"]["load_avg"])
    print(f"fold val mAPs: {' '.join(f'{v:.4f}' for v in c['fold_val_map'])}; torch threads "
          f"{result['setting']['threads']}; load average at the end {load}; overrides: {args.overrides or 'none'}")


if __name__ == "__main__":
    main()
