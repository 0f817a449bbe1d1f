"""Distillation on one data set: members (the recipe at several seeds), their ensemble, and students
of the best member's recipe, as `aicoss distill` trains them, beside the recipe trained on labels
alone at the same seeds.

  members:   RECIPE at --member-seeds (default 41, 7, 1), on labels alone;
  ensemble:  their equal-weight mean (`aicoss ensemble`'s job);
  students:  the best member's recipe (its arch and epochs) at each of --seeds (default 41, 7):
             (a) distilled on the train split, (b) with the test images as unlabeled data, at
             weight 0.9; at the first seed also (a) at the other --weights (default 0.5, 1.0);
  labels:    the same recipe at the same seed on labels alone: the member of that seed, or a run.

Each row: val mAP (best epoch) and, where the data has test_labels.csv, test mAP (the kept
checkpoint's submission, `aicoss score`), and the fraction of the ensemble's gain over its best
member that the row recovers, (row − best member) / (ensemble − best member). Then img/s of one
student against the ensemble, both through `aicoss ensemble`'s loop on the test images (best of
two rounds). Mode "cached" by default when the recipe does not augment: the online teacher would
see exactly the clean images, so the targets are the same at a fraction of the cost.

    python bench/photo_data.py data/photos --n-train 1500 --n-test 500
    python bench/distill.py --data data/photos
    python bench/distill.py --data data/digits
    python bench/distill.py --data data/photos --member-runs runs/starter_member/* --seeds 41 --weights "" \
        --student-set augment.policy=weak                 # online teachers on the augmented batch
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import ROOT, printer, scratch_folder  # noqa: E402  (puts the package on the path)


def csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def csv_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def recipe_for(args, name: str, seed: int, extra: list[str] = ()):
    from aicoss_cli.recipe import load_recipe, resolve_recipe

    overrides = [*args.overrides, f"runtime.seed={seed}", f"name={name}", *extra]
    return resolve_recipe(load_recipe(args.recipe, overrides), data_root=args.data)


def train(recipe, out: Path, say) -> dict:
    from aicoss_cli.train.trainer import Trainer

    say(f"training {recipe.name} (seed {recipe.runtime.seed})")
    t0 = time.perf_counter()
    result = Trainer(recipe, out).run()
    return {"run_dir": str(result.run_dir), "val_map": result.best_map, "seconds": time.perf_counter() - t0,
            "test_map": test_map(result.run_dir / "submission.csv", Path(recipe.data.root))}


def test_map(submission: Path, root: Path) -> float | None:
    from aicoss_cli.evaluation.score import score_files

    labels = root / "test_labels.csv"
    return score_files(submission, labels)["map"] if labels.is_file() else None


def finished_member(run_dir: Path, root: Path) -> tuple[int, dict]:
    """(seed, row) of a member run trained before (--member-runs), scored on the test labels of
    --data (the run's own [data] root may be relative to another folder)."""
    from aicoss_cli.recipe import recipe_from_toml
    from aicoss_cli.results.runs import load_run

    run = load_run(run_dir)
    recipe = recipe_from_toml((run_dir / "recipe.toml").read_text(encoding="utf-8"), str(run_dir))
    return recipe.runtime.seed, {"run_dir": str(run_dir), "val_map": run.best_val_map, "seconds": run.train_seconds,
                                 "test_map": test_map(run_dir / "submission.csv", root)}


def kept(row: dict) -> Path:
    from aicoss_cli.results.layout import kept_file, run_keep

    return kept_file(row["run_dir"], run_keep(row["run_dir"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "starter.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    parser.add_argument("--member-seeds", type=csv_ints, default=[41, 7, 1])
    parser.add_argument("--member-runs", type=Path, nargs="+", help="members trained before (instead of training)")
    parser.add_argument("--student-set", action="append", default=[],
                        help="override for the students and their labels-only twins (then trained, not the members)")
    parser.add_argument("--seeds", type=csv_ints, default=[41, 7], help="student seeds")
    parser.add_argument("--weight", type=float, default=0.9, help="the students' weight")
    parser.add_argument("--weights", type=csv_floats, default=[0.5, 1.0], help="other weights, (a) at the first seed")
    parser.add_argument("--mode", choices=["online", "cached"], help="default: cached without augmentation")
    parser.add_argument("--batch-size", type=int, default=64, help="of the img/s measurement")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--save", type=Path, help="also write the result as JSON to this file")
    args = parser.parse_args()
    say = printer(args.json)

    import torch

    from aicoss_cli.infer.ensemble import run_ensemble
    from aicoss_cli.results.distillation import gain_recovered
    from aicoss_cli.train.distill import distill_overrides

    base = recipe_for(args, "probe", args.seeds[0], args.student_set)
    mode = args.mode or ("cached" if base.augment.policy == "none" else "online")
    stem = base.name if base.name != "probe" else args.recipe.stem
    with scratch_folder("aicoss-bench-distill-") as scratch:
        out = args.out or scratch
        if args.member_runs:
            members = dict(finished_member(run, args.data) for run in args.member_runs)
        else:
            members = {s: train(recipe_for(args, f"{stem}_member", s), out, say) for s in args.member_seeds}
        best_seed = max(members, key=lambda s: members[s]["val_map"])
        ens = run_ensemble([kept(m) for m in members.values()], data=args.data, out=scratch / "ensemble.csv",
                           batch_size=args.batch_size, overwrite=True)
        ensemble = {"val_map": ens.val_map, "test_map": test_map(scratch / "ensemble.csv", args.data)}
        teachers = [m["run_dir"] for m in members.values()]
        rows = []
        for i, seed in enumerate(args.seeds):
            twin = (None if args.student_set else members.get(seed)) or train(
                recipe_for(args, f"{stem}_labels", seed, args.student_set), out, say)
            rows.append({"model": "labels only", "seed": seed, "weight": None, **twin})
            variants = [("(a) train split", w, None) for w in ([args.weight] + (args.weights if i == 0 else []))]
            variants.insert(1, ("(b) + test unlabeled", args.weight, ["test"]))
            for label, weight, unlabeled in variants:
                extra = [*args.student_set, *distill_overrides(teachers, weight, mode, unlabeled)]
                tag = f"{stem}_distill_{'b' if unlabeled else 'a'}_w{weight:g}"
                rows.append({"model": label, "seed": seed, "weight": weight,
                             **train(recipe_for(args, tag, seed, extra), out, say)})
        student = next(r for r in rows if r["weight"] is not None)
        speeds = {"ensemble": 0.0, "student": 0.0}
        for _ in range(2):  # alternated, the best of two: the machine is shared
            for key, checkpoints in (("ensemble", [kept(m) for m in members.values()]), ("student", [kept(student)])):
                speed = run_ensemble(checkpoints, data=args.data, out=scratch / f"speed_{key}.csv",
                                     batch_size=args.batch_size, overwrite=True).img_per_s
                speeds[key] = max(speeds[key], speed)

    best = members[best_seed]
    for r in [*members.values(), *rows]:
        r["val_gain"] = gain_recovered(best["val_map"], ensemble["val_map"], r["val_map"])
        r["test_gain"] = gain_recovered(best["test_map"], ensemble["test_map"], r["test_map"])
    setting = {"data": str(args.data), "recipe": str(args.recipe), "overrides": args.overrides,
               "student_overrides": args.student_set, "mode": mode,
               "epochs": base.optim.epochs, "img_size": base.model.img_size, "arch": base.model.arch,
               "member_seeds": list(members), "best_member_seed": best_seed, "threads": torch.get_num_threads(),
               "cpu": _cpu(), "load_avg": os.getloadavg()}
    report = {"setting": setting, "members": members, "ensemble": ensemble, "rows": rows, "img_per_s": speeds,
              "ratios": {"student / ensemble img/s": speeds["student"] / speeds["ensemble"]}}
    if args.save:
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print_table(report, members, best_seed, ensemble, rows, speeds)


def print_table(report, members, best_seed, ensemble, rows, speeds) -> None:
    from rich.table import Table

    from aicoss_cli.base.console import out as console

    s = report["setting"]

    def num(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}"

    def share(v):
        return "-" if v is None else f"{v:.0%}"

    table = Table(title=f"{s['data']}: {s['arch']}, {s['epochs']} epochs, {s['img_size']} px, teachers {s['mode']}",
                  title_justify="left")
    for col in ("model", "seed", "weight", "val mAP", "test mAP", "val gain recovered", "test gain recovered",
                "seconds"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for seed, m in members.items():
        table.add_row("member" + (" (best on val)" if seed == best_seed else ""), str(seed), "", num(m["val_map"]),
                      num(m["test_map"]), "", "", f"{m['seconds']:.0f}")
    table.add_row(f"ensemble of {len(members)} (equal weights)", "", "", num(ensemble["val_map"]),
                  num(ensemble["test_map"]), "100%", "100%", "", style="bold")
    for r in rows:
        table.add_row(r["model"], str(r["seed"]), "" if r["weight"] is None else f"{r['weight']:g}", num(r["val_map"]),
                      num(r["test_map"]), share(r["val_gain"]), share(r["test_gain"]), f"{r['seconds']:.0f}",
                      style="green" if r["weight"] is not None else None)
    console.print(table)
    print(f"img/s on the test images (aicoss ensemble's loop, batch 64, best of 2): ensemble {speeds['ensemble']:.0f}, "
          f"one student {speeds['student']:.0f} ({speeds['student'] / speeds['ensemble']:.1f}x)")
    load = ", ".join(f"{v:.1f}" for v in s["load_avg"])
    print(f"{s['cpu']}; torch threads {s['threads']}; load average at the end {load}; overrides: "
          f"{s['overrides'] or 'none'}; student overrides: {s['student_overrides'] or 'none'}")


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
