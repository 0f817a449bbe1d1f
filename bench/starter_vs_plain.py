"""The starter recipe against the loop a user writes first, side by side in one run, on one data set.

  plain:  timm.create_model(ARCH, num_classes=K), BCEWithLogitsLoss, AdamW(lr=1e-3) with PyTorch's
          defaults (weight decay 0.01), no schedule, no augmentation; PIL resize + ImageNet
          normalisation; val mAP with scikit-learn after every epoch;
  aicoss: `aicoss train RECIPE` (default recipes/starter.toml) through the public Trainer;

at the recipe's epochs, input size, batch size and seed, on the same train/val split (the seed's
`train_test_split(test_size=val_fraction, random_state=split_seed)`, checked against the ids the
aicoss run validated on). Both are scored the same way, with scikit-learn's average precision on
val after every epoch and, where the data has `test_labels.csv`, on the test set with the weights
of the best val epoch. Prints both numbers side by side (`--json`: JSON only).

    python bench/starter_vs_plain.py --data data/demo
    python bench/starter_vs_plain.py --data data/photos --set augment.policy=weak
    python bench/starter_vs_plain.py --data data/demo --recipe recipes/demo.toml --plain-arch resnet18
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def macro_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's AP per class over the annotated entries, averaged over classes with a positive."""
    from sklearn.metrics import average_precision_score

    aps = []
    for k in range(targets.shape[1]):
        known = targets[:, k] >= 0
        if (targets[known, k] == 1).any():
            aps.append(average_precision_score(targets[known, k], scores[known, k]))
    return float(np.mean(aps))


def load_images(root: Path, paths, size: int):
    """uint8 (N, 3, size, size), PIL bilinear resize, as a plain loop reads them."""
    import torch
    from PIL import Image

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(root / p) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out


def plain_loop(root: Path, arch: str, epochs: int, size: int, batch: int, seed: int, val_fraction: float,
               split_seed: int, lr: float) -> dict:
    import pandas as pd
    import timm
    import torch
    from sklearn.model_selection import train_test_split

    frame = pd.read_csv(root / "train.csv")
    classes = [c for c in frame.columns if c not in ("img_id", "img_path")]
    train_df, val_df = train_test_split(frame, test_size=val_fraction, random_state=split_seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    def norm(x):
        return (x.float() - mean) / std

    x_train, x_val = load_images(root, train_df.img_path, size), load_images(root, val_df.img_path, size)
    y_train = torch.tensor(train_df[classes].to_numpy(), dtype=torch.float32)
    y_val = val_df[classes].to_numpy()
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    generator = torch.Generator().manual_seed(seed)

    def predict(x):
        model.eval()
        with torch.inference_mode():
            return torch.cat([torch.sigmoid(model(norm(x[i:i + 256]))) for i in range(0, len(x), 256)]).numpy()

    rows, best, best_state, t0 = [], -1.0, None, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order) - batch + 1, batch):  # drop the last partial batch, as the engine does
            idx = order[i:i + batch]
            y = y_train[idx]
            known = (y >= 0).float()
            loss = (loss_fn(model(norm(x_train[idx])), y.clamp(min=0)) * known).sum() / known.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_map = macro_ap(y_val, predict(x_val))
        rows.append(val_map)
        if val_map > best:
            best, best_state = val_map, copy.deepcopy(model.state_dict())
    seconds = time.perf_counter() - t0
    result = {"val_map_best": best, "best_epoch": int(np.argmax(rows)) + 1, "val_map_last": rows[-1],
              "val_maps": rows, "seconds": seconds, "val_ids": sorted(val_df.img_id.astype(str))}
    labels = root / "test_labels.csv"
    if labels.is_file():
        model.load_state_dict(best_state)
        test = pd.read_csv(root / "test.csv")
        truth = pd.read_csv(labels).set_index("img_id").loc[test.img_id, classes].to_numpy()
        result["test_map"] = macro_ap(truth, predict(load_images(root, test.img_path, size)))
    return result


def aicoss_run(recipe, out: Path) -> dict:
    import pandas as pd

    from aicoss_cli.base.console import err
    from aicoss_cli.train.trainer import Trainer

    t0 = time.perf_counter()
    result = Trainer(recipe, out, console=err).run()
    seconds = time.perf_counter() - t0
    maps = [float(r["val_map"]) for r in result.rows]
    val_ids = sorted(pd.read_csv(result.run_dir / "val_scores.csv").img_id.astype(str))
    out_row = {"val_map_best": result.best_map, "best_epoch": result.best_epoch, "val_map_last": maps[-1],
               "val_maps": maps, "seconds": seconds, "val_ids": val_ids, "run_dir": str(result.run_dir)}
    root = Path(recipe.data.root)
    labels = root / "test_labels.csv"
    if labels.is_file():
        sub = pd.read_csv(result.run_dir / "submission.csv").set_index("img_id")
        truth = pd.read_csv(labels).set_index("img_id").loc[sub.index, list(sub.columns)].to_numpy()
        out_row["test_map"] = macro_ap(truth, sub.to_numpy())
    return out_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "starter.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--plain-arch", default="resnet18", help="timm model of the plain loop (default resnet18)")
    parser.add_argument("--plain-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, help="keep the aicoss run here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from aicoss_cli.recipe import load_recipe, resolve_recipe

    recipe = resolve_recipe(load_recipe(args.recipe, args.overrides), data_root=args.data)
    o, m = recipe.optim, recipe.model
    out = args.out or Path(tempfile.mkdtemp(prefix="starter_vs_plain."))
    try:
        ours = aicoss_run(recipe, out)
        plain = plain_loop(args.data, args.plain_arch, o.epochs, m.img_size, o.batch_size, recipe.runtime.seed,
                           recipe.data.val_fraction, recipe.data.split_seed, args.plain_lr)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if plain["val_ids"] != ours["val_ids"] or recipe.data.split != "random":
        raise SystemExit("the two runs did not validate on the same images")
    setting = {"data": str(args.data), "recipe": str(args.recipe), "overrides": args.overrides,
               "epochs": o.epochs, "img_size": m.img_size, "batch_size": o.batch_size, "seed": recipe.runtime.seed,
               "plain_arch": args.plain_arch, "aicoss_arch": m.arch, "n_val": len(ours["val_ids"]),
               "threads": __import__("torch").get_num_threads(), "load_avg": os.getloadavg()}
    for r in (ours, plain):
        del r["val_ids"]
    if args.json:
        print(json.dumps({"setting": setting, "plain": plain, "aicoss": ours}, indent=2))
        return
    from rich.table import Table

    from aicoss_cli.base.console import out as console

    table = Table(title=f"{args.data}: {o.epochs} epochs, {m.img_size} px, batch {o.batch_size}, seed "
                  f"{recipe.runtime.seed}, {setting['n_val']} val images", title_justify="left")
    table.add_column("")
    table.add_column(f"plain timm {args.plain_arch} + BCE + AdamW", justify="right")
    table.add_column(f"aicoss {args.recipe.name} ({m.arch})", justify="right")
    table.add_row("val mAP, best epoch", f"{plain['val_map_best']:.4f} ({plain['best_epoch']})",
                  f"{ours['val_map_best']:.4f} ({ours['best_epoch']})")
    table.add_row("val mAP, last epoch", f"{plain['val_map_last']:.4f}", f"{ours['val_map_last']:.4f}")
    if "test_map" in ours:
        table.add_row("test mAP, best val epoch", f"{plain['test_map']:.4f}", f"{ours['test_map']:.4f}")
    table.add_row("val mAP per epoch", " ".join(f"{v:.3f}" for v in plain["val_maps"]),
                  " ".join(f"{v:.3f}" for v in ours["val_maps"]))
    table.add_row("seconds (training + evaluation)", f"{plain['seconds']:.0f}", f"{ours['seconds']:.0f}")
    console.print(table)
    load = ", ".join(f"{v:.1f}" for v in setting["load_avg"])
    print(f"torch threads {setting['threads']}; load average at the end {load}; overrides: {args.overrides or 'none'}")


if __name__ == "__main__":
    main()
