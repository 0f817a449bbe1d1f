"""How much does the inference loop cost on top of the model? One run, same model, batch and dtype:

  (a) the pure model forward on pre-made, normalised tensors (the ceiling);
  (b) `aicoss predict`'s loop with the defaults a user gets (read, decode, normalise, forward,
      sigmoid), and `predict` end to end (checkpoint load, CSVs, the loop, CSV write);
  (c) a naive loop of the seed's kind: a Dataset that looks each row up in a pandas frame, opens
      the file with PIL, applies torchvision Resize/ToTensor/Normalize, and a loop that appends
      `.tolist()` per batch;

and prints b/a and c/a (throughput ratios). For a 3-member ensemble of mixed input sizes it prints
the ratio of the ensemble's throughput (each image decoded once, resized per member) to the
harmonic combination 1 / Σ 1/T_i of its members' pure forward throughputs T_i.

The machine's speed drifts on a shared host, by more than the few per cent measured here, so the
loops are compared batch by batch: every method runs on batch i (in alternating order) before any
runs on batch i+1, and a ratio is the ratio of the summed times. What cannot be cut into batches
(whole commands, loader processes) is compared per round against the forward measured just before,
and the median over rounds is reported.

    python bench/inference_overhead.py      # 512 demo images of 64 px, resnet18_mldecoder, batch 32, fp32
    python bench/inference_overhead.py --data data/demo --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import demo_test_set, interleaved, printer, random_checkpoint, scratch_folder  # noqa: E402  (puts the package on the path)

from aicoss_cli.data.loading import IMAGENET_MEAN, IMAGENET_STD
from aicoss_cli.data.tables import read_test


def premade_inputs(chunks: list[list[str]], size: int) -> list[torch.Tensor]:
    """The batches decoded, resized and normalised ahead of time, in the memory format predict
    feeds the model on the CPU (contiguous NCHW)."""
    from aicoss_cli.data.images import decode_batch
    from aicoss_cli.data.loading import normalize

    return [normalize(decode_batch(chunk, [size])[0][0]).contiguous() for chunk in chunks]


def seed_dataset(root: Path, size: int):
    """(c): the seed's kind of Dataset: a pandas row lookup, PIL, torchvision transforms."""
    import pandas as pd
    from PIL import Image
    from torchvision import transforms

    class SeedDataset(torch.utils.data.Dataset):
        def __init__(self, frame: pd.DataFrame, transform):
            self.frame, self.transform = frame, transform

        def __len__(self):
            return len(self.frame)

        def __getitem__(self, idx):
            row = self.frame.iloc[idx]
            image = Image.open(os.path.join(root, row["img_path"])).convert("RGB")
            return self.transform(image)

    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return SeedDataset(pd.read_csv(root / "test.csv"), transform)


def main() -> None:
    with scratch_folder() as tmp:
        measure(tmp)


def measure(tmp: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a DACON-layout data root (default: demo images in a temp folder)")
    parser.add_argument("--images", type=int, default=512, help="test images of the generated demo set")
    parser.add_argument("--arch", default="resnet18_mldecoder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", default="resnet18_mldecoder@64,resnet18_mldecoder@96,resnet50@48",
                        help="ensemble members as arch@size,...")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    from torch.utils.data import DataLoader, default_collate

    from aicoss_cli.base.runtime import make_runtime
    from aicoss_cli.data.images import decode_batch
    from aicoss_cli.infer.ensemble import run_ensemble
    from aicoss_cli.infer.forward import MemberSource, forward, load_members
    from aicoss_cli.infer.predict import run_predict

    say = printer(args.json)
    root = args.data or demo_test_set(tmp / "demo", args.images, args.size, say)
    test = read_test(root)
    n, batch = len(test), args.batch_size
    chunks = [test.paths[i:i + batch] for i in range(0, n, batch)]
    rt = make_runtime("cpu", "fp32", None)  # the defaults a user gets on this machine
    cpu = rt.device

    ckpt = random_checkpoint(tmp / "model.safetensors", args.arch, args.size, test.classes, root, 0)
    single = load_members([MemberSource(ckpt)], rt)
    model = single[0].model  # (a), (b) and (c) run this very model object
    specs = [(s.split("@")[0], int(s.split("@")[1])) for s in args.members.split(",")]
    member_ckpts = [random_checkpoint(tmp / f"member{i}.safetensors", a, s, test.classes, root, i + 1)
                    for i, (a, s) in enumerate(specs)]
    members = load_members([MemberSource(p) for p in member_ckpts], rt)
    sizes = sorted({args.size, *(s for _, s in specs)})
    inputs = {size: premade_inputs(chunks, size) for size in sizes}
    dataset = seed_dataset(root, args.size)

    def loop_step(ms):
        def step(i):
            forward(ms, chunks[i], rt, batch)
        return step

    def naive_step(i):
        x = default_collate([dataset[j] for j in range(i * batch, i * batch + len(chunks[i]))])
        torch.sigmoid(model(x)).tolist()

    steps = {
        "a": lambda i: model(inputs[args.size][i]),
        "b": loop_step(single),
        "c": naive_step,
        **{f"m{k}": (lambda i, k=k: members[k].model(inputs[members[k].img_size][i])) for k in range(len(members))},
        "ens": loop_step(members),
        "decode": lambda i: decode_batch(chunks[i], [args.size]),
        "ens_decode": lambda i: decode_batch(chunks[i], sorted({m.img_size for m in members})),
    }

    def whole(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def pure_all(m=model, size=args.size) -> float:
        with torch.inference_mode():
            return whole(lambda: [m(x) for x in inputs[size]])

    def naive_workers(workers: int) -> float:
        def run():
            preds = []
            loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers)
            with torch.no_grad():
                for x in loader:
                    preds.extend(torch.sigmoid(model(x)).tolist())
        return whole(run)

    def loop_with(loader: str) -> float:
        from aicoss_cli.base.runtime import Runtime

        class InlineRuntime(Runtime):  # decoding inline, between two forward passes
            background = False

        if loader == "inline":
            custom = InlineRuntime(cpu, None, 0, False)
        else:
            custom = Runtime(cpu, None, int(loader), False)
        return whole(lambda: forward(single, test.paths, custom, batch))

    wholes = {
        "predict end to end": lambda: whole(lambda: run_predict(ckpt, data=root, out=tmp / "pred.csv",
                                                                batch_size=batch, precision="fp32", device="cpu", overwrite=True)),
        "predict loop, decoding inline": lambda: loop_with("inline"),
        "predict loop, 1 loader process": lambda: loop_with("1"),
        "predict loop, 2 loader processes": lambda: loop_with("2"),
        "naive seed loop, 2 loader workers": lambda: naive_workers(2),
    }

    load_before = os.getloadavg()[0]
    say(f"{n} images, batch {batch}, fp32, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; "
        f"default loader: {rt.loader}")
    interleaved(steps, min(2, len(chunks)), 1)  # warm-up
    forward(members, test.paths[:batch], rt, batch)
    say(f"batch-interleaved: {args.rounds} rounds × {len(chunks)} batches × {len(steps)} methods")
    t = interleaved(steps, len(chunks), args.rounds)
    images = n * args.rounds
    ips = {k: images / v for k, v in t.items()}
    harmonic = images / sum(t[f"m{k}"] for k in range(len(members)))
    ratios = {
        "b/a  predict loop (default loader)": t["a"] / t["b"],
        "c/a  naive seed loop, no workers": t["a"] / t["c"],
        "ensemble / harmonic(members), loop": ips["ens"] / harmonic,
    }
    say(f"whole runs: {args.rounds} rounds, each against the forward measured just before")
    whole_ratios: dict[str, list[float]] = {k: [] for k in wholes}
    ens_e2e: list[float] = []
    for r in range(args.rounds):
        for name, fn in wholes.items():
            a_time = pure_all()
            whole_ratios[name].append(a_time / fn())
        m_time = sum(pure_all(m.model, m.img_size) for m in members)
        ens_e2e.append(m_time / whole(lambda: run_ensemble(member_ckpts, data=root, out=tmp / "ens.csv",
                                                           batch_size=batch, device="cpu", overwrite=True)))
        say(f"round {r + 1}/{args.rounds} done")
    for name, values in whole_ratios.items():
        ratios[("b/a  " if name.startswith("predict") else "c/a  ") + name] = statistics.median(values)
    ratios["ensemble / harmonic(members), end to end"] = statistics.median(ens_e2e)

    report = {
        "images": n, "batch_size": batch, "dtype": "fp32", "arch": args.arch, "size": args.size,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "rounds": args.rounds,
        "default_loader": rt.loader, "ensemble_members": [f"{a}@{s}" for a, s in specs],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "img_per_sec_batch_interleaved": {k: round(v, 1) for k, v in ips.items()},
        "decode_share": {"predict loop": round(t["decode"] / t["b"], 4), "ensemble loop": round(t["ens_decode"] / t["ens"], 4)},
        "harmonic_members_img_per_sec": round(harmonic, 1),
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    names = {"a": "a: pure forward", "b": "b: predict loop", "c": "c: naive seed loop (no workers)",
             **{f"m{k}": f"member {k + 1} pure forward ({a}@{s})" for k, (a, s) in enumerate(specs)},
             "ens": "ensemble loop (3 members)"}
    print(f"{n} images of {args.size} px, batch {batch}, fp32, {report['torch_threads']} torch threads on "
          f"{report['cpus']} CPUs, default loader: {rt.loader}; load average {report['load_average'][0]} before, "
          f"{report['load_average'][1]} after")
    width = max(map(len, names.values()))
    for k, label in names.items():
        print(f"  {label:{width}}  {ips[k]:8.1f} img/s")
    print(f"  {'harmonic combination of the members':{width}}  {harmonic:8.1f} img/s")
    print(f"reading + decoding: {t['decode'] / t['b']:.1%} of the predict loop's time; reading + decoding once + "
          f"resizing per member: {t['ens_decode'] / t['ens']:.1%} of the ensemble loop's")
    width = max(map(len, ratios))
    for k, v in ratios.items():
        print(f"{k:{width}}  {v:.3f}")


if __name__ == "__main__":
    main()
