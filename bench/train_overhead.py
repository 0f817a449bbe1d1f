"""How much does the training loop cost on top of the pure train step? One run, same model, batch,
input size and precision:

  (a) pure train steps on pre-made, normalised tensors: forward, loss, backward, the optimizer step
      (the same fused AdamW the engine uses, so the ratio measures the loop, not the optimizer);
  (b) the engine's epoch (`Trainer._train_epoch`) on the demo images without augmentation: the
      loader (read, decode, resize), normalisation on the device, the grad scaler, the progress
      display, the per-step boundary record, the checks;
  (c) the same with the weak and the strong augmentation policies;

and prints img/s of each and the ratios b/a, c/a. Rounds alternate a, b, c... so drift of the
machine's speed hits all of them; the warm-up (first steps, allocator, kernel choice) runs before
the first timed round. Then it measures the pieces of the difference on their own: the loader's
img/s with 0 and 1 worker processes per policy, the per-step boundary record (RNG snapshot and
device copies), normalisation, and the host read the loop does about once a second.

    python bench/train_overhead.py                       # resnet18_mldecoder @ 48 px, batch 64, fp32
    python bench/train_overhead.py --steps 8 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import printer, scratch_folder  # noqa: E402  (puts the package on the path)

RECIPE = """
name = "bench"
[model]
arch = "{arch}"
img_size = {size}
[loss]
name = "bce"
[optim]
epochs = 2
batch_size = {batch}
lr = 1e-3
min_lr = 1e-5
weight_decay = 1e-4
[augment]
policy = "{policy}"
magnitude = 5
num_ops = 1
cutout_factor = 0.25
[data]
root = "{root}"
val_fraction = 0.1
[runtime]
seed = 41
precision = "{precision}"
device = "{device}"
num_workers = {workers}
"""


def make_trainer(root: Path, out: Path, args, policy: str, workers: int):
    """A set-up Trainer whose epoch the bench can run again and again."""
    from aicoss_cli.base import distributed
    from aicoss_cli.recipe import recipe_from_toml, resolve_recipe
    from aicoss_cli.train.trainer import Trainer

    text = RECIPE.format(arch=args.arch, size=args.size, batch=args.batch_size, policy=policy, root=root,
                         precision=args.precision, workers=workers, device=args.device)
    trainer = Trainer(resolve_recipe(recipe_from_toml(text, "bench")), out)
    trainer.info = distributed.setup(False)
    trainer.setup()
    return trainer


def engine_epoch(trainer) -> tuple[float, int]:
    """(seconds, images) of one epoch of the engine's loop, from step 0."""
    from aicoss_cli.base.console import progress_display
    from aicoss_cli.train.run_dir import StopFlag

    p = trainer.progress
    p.epoch, p.step, p.loss_sum, p.loss_count, p.seconds = 0, 0, 0.0, 0, 0.0
    with StopFlag() as stop, progress_display(None, enabled=False) as bar:
        t0 = time.perf_counter()
        trainer._train_epoch(bar, stop)
        trainer.rt.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, p.step * trainer.recipe.optim.batch_size


def pure_steps(trainer, batches) -> tuple[float, int]:
    """(seconds, images) of the plain loop on pre-made tensors, same model, loss and optimizer."""
    model, loss_fn, optimizer, rt = trainer.model, trainer.loss_fn, trainer.optimizer, trainer.rt
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        with rt.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rt.synchronize()
    return time.perf_counter() - t0, sum(len(x) for x, _ in batches)


def loader_img_per_s(trainer, workers: int, steps: int) -> float:
    """The training loader alone (decode, resize, augment, collate), no model."""
    from aicoss_cli.data.samplers import TrainBatches, make_loader

    r = trainer.recipe
    sampler = TrainBatches(trainer.data.train_rows, r.optim.batch_size, 1, 0, 1, r.runtime.seed, 0,
                           augment=r.augment.policy != "none")
    loader = make_loader(trainer.train_set, sampler, workers, False)
    t0, n = time.perf_counter(), 0
    for i, (images, *_rest) in enumerate(loader):
        n += len(images)
        if i + 1 >= steps:
            break
    return n / (time.perf_counter() - t0)


def per_call_us(fn, repeat: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18_mldecoder")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--workers", type=int, default=0, help="loader processes of the engine's epochs")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    with scratch_folder("aicoss-train-bench-") as tmp:
        report = measure(tmp, args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['arch']} @ {report['size']} px, batch {report['batch_size']}, {report['precision']} on "
          f"{report['device']}, "
          f"{report['steps']} steps × {report['rounds']} rounds, {report['torch_threads']} torch threads on "
          f"{report['cpus']} CPUs; load average {report['load_average'][0]} before, {report['load_average'][1]} after")
    for k, v in report["img_per_s"].items():
        print(f"  {k:34} {v:8.1f} img/s")
    for k, v in report["ratios"].items():
        print(f"  {k:34} {v:8.3f}")
    print("where the difference goes (share of a pure step's time):")
    for k, v in report["costs"].items():
        print(f"  {k:84} {v:8.2%}")
    print("the training loader alone (decode, resize, augment; no model), img/s:")
    for k, v in report["loader_img_per_s"].items():
        print(f"  {k:34} {v:8.1f}")


def measure(tmp: Path, args) -> dict:
    from aicoss_cli.data.demo import build_demo_data
    from aicoss_cli.data.loading import Normalizer
    from aicoss_cli.train.state import rng_state

    say = printer(args.json)
    n_train = int(args.steps * args.batch_size / 0.9) + 2
    say(f"building {n_train} demo images of 64 px in {tmp}")
    root = build_demo_data(tmp / "demo", n_train=n_train, n_test=16, size=64, seed=0)
    load_before = os.getloadavg()[0]
    engines = {policy: make_trainer(root, tmp / "runs", args, policy, args.workers)
               for policy in ("none", "weak", "strong")}
    base = engines["none"]
    for other in engines.values():  # every loop trains the very same model object from the same state
        other.raw_model, other.model, other.optimizer, other.scaler = base.raw_model, base.model, base.optimizer, base.scaler
        other.step = base.step

    normalize = Normalizer(base.rt.device, torch.channels_last if base.rt.channels_last else torch.contiguous_format)
    from aicoss_cli.data.samplers import TrainBatches, make_loader

    sampler = TrainBatches(base.data.train_rows, args.batch_size, 1, 0, 1, 41, 0, augment=False)
    batches = [(normalize(images.to(base.rt.device)), targets.to(base.rt.device))
               for images, targets, _, _ in make_loader(base.train_set, sampler, 0, False)]

    say("warm-up")
    first = [pure_steps(base, batches[i:i + 1])[0] for i in range(3)]  # a fresh process's first steps
    pure_steps(base, batches[:3])
    for engine in engines.values():
        engine_epoch(engine)

    times: dict[str, list[float]] = {"a": [], "b": [], "c weak": [], "c strong": []}
    ratios: dict[str, list[float]] = {"b/a": [], "c/a weak": [], "c/a strong": []}
    for r in range(args.rounds):
        sec, n = pure_steps(base, batches)
        a = n / sec
        times["a"].append(a)
        for key, policy in (("b", "none"), ("c weak", "weak"), ("c strong", "strong")):
            sec, n = engine_epoch(engines[policy])
            times[key].append(n / sec)
            ratios["b/a" if policy == "none" else f"c/a {policy}"].append((n / sec) / a)
        say(f"round {r + 1}/{args.rounds}: a {a:.1f} img/s, b/a {ratios['b/a'][-1]:.3f}")

    step_s = 1.0 / statistics.median(times["a"]) * args.batch_size  # seconds of one pure step
    loader = {f"{policy}, {w} worker{'s' if w != 1 else ''}": loader_img_per_s(engines[policy], w, args.steps)
              for policy in ("none", "weak", "strong") for w in (0, 1)}
    images = batches[0][0]
    raw = (images * 0).to(torch.uint8)
    loss_sum = torch.zeros((), dtype=torch.float64, device=base.rt.device)
    costs = {
        "decode + resize + collate, inline (1 / loader img/s, none, 0 workers)":
            args.batch_size / loader["none, 0 workers"] / step_s,
        "boundary record per step (RNG snapshot + device copies)":
            per_call_us(lambda: (rng_state(), loss_sum.clone())) * 1e-6 / step_s,
        "uint8 -> normalised float32 per batch": per_call_us(lambda: normalize(raw), 20) * 1e-6 / step_s,
        "host read of the running loss (about once a second)": per_call_us(lambda: float(loss_sum)) * 1e-6 / step_s,
        "first step of a fresh process (kernel set-up; not in the timed rounds), extra time":
            (first[0] - statistics.median(first[1:])) / step_s,
    }
    return {
        "arch": args.arch, "size": args.size, "batch_size": args.batch_size, "precision": args.precision,
        "device": base.rt.describe(),
        "steps": args.steps, "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "img_per_s": {{"a": "a: pure train step", "b": "b: engine, no augmentation", "c weak": "c: engine, weak",
                       "c strong": "c: engine, strong"}[k]: round(statistics.median(v), 1) for k, v in times.items()},
        "ratios": {k: round(statistics.median(v), 4) for k, v in ratios.items()},
        "costs": {k: round(v, 5) for k, v in costs.items()},
        "loader_img_per_s": {k: round(v, 1) for k, v in loader.items()},
    }


if __name__ == "__main__":
    main()
