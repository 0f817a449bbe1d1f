"""CPU throughput of PyTorch eager vs ONNX Runtime for the same model, batch and images, in one run.

The model is exported with `aicoss export` (ONNX, dynamic batch, fp32) and both run it with its
sigmoid on the same pre-made, normalised batches (decoded as predict decodes them): PyTorch under
`torch.inference_mode`, ONNX Runtime through `aicoss_cli.export.OnnxModel` (CPU provider; each
with its default threads, or --threads for both). The machine's speed drifts on a shared host, so
the two are compared batch by batch: both run on batch i (in alternating order) before either runs
on batch i+1, and the ratio is the ratio of the summed times.

    python bench/onnx_vs_torch.py        # 512 demo images of 64 px, resnet18_mldecoder, batch 32
    python bench/onnx_vs_torch.py --arch tf_efficientnet_lite0_mldecoder --size 96 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aicoss_cli.checkpoint import CheckpointMeta, model_from_checkpoint, save_checkpoint  # noqa: E402
from aicoss_cli.data import normalize, read_test  # noqa: E402


def save_model(path: Path, arch: str, size: int, classes: list[str], root: Path) -> Path:
    """A random-init checkpoint (throughput does not depend on the weights)."""
    from aicoss_cli.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, len(classes), img_size=size)
    meta = CheckpointMeta(arch=arch, img_size=size, classes=classes, recipe_toml=f'[data]\nroot = "{root}"\n')
    save_checkpoint(path, model.state_dict(), meta)
    return path


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="aicoss-bench-"))
    try:
        measure(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(tmp: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a DACON-layout data root (default: demo images in a temp folder)")
    parser.add_argument("--images", type=int, default=512, help="test images of the generated demo set")
    parser.add_argument("--arch", default="resnet18_mldecoder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads for both (default: each library's own)")
    parser.add_argument("--ort-spin", action=argparse.BooleanOptionalAction, default=False,
                        help="let ONNX Runtime's idle threads spin between runs (its default; off here, since a "
                             "spinning thread takes the core PyTorch runs on next)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    from aicoss_cli.onnx_model import OnnxModel, Probabilities, export_checkpoint
    from aicoss_cli.inference import decode_batch

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    root = args.data
    if root is None:
        from aicoss_cli.demo import build_demo_data

        say(f"building {args.images} demo images of {args.size} px in {tmp / 'demo'}")
        root = build_demo_data(tmp / "demo", n_train=10, n_test=args.images, size=args.size, seed=0)
    test = read_test(root)
    chunks = [test.paths[i:i + args.batch_size] for i in range(0, len(test), args.batch_size)]
    inputs = [normalize(decode_batch(chunk, [args.size])[0][0]).contiguous() for chunk in chunks]

    checkpoint = save_model(tmp / "model.safetensors", args.arch, args.size, test.classes, root)
    say(f"exporting {args.arch} @ {args.size} px to ONNX")
    exported = export_checkpoint(checkpoint, "onnx", tmp / "model.onnx", data=root)
    if args.threads:
        torch.set_num_threads(args.threads)
    onnx_model = OnnxModel.load(exported.path, threads=args.threads, spin=args.ort_spin)
    model, _ = model_from_checkpoint(checkpoint)
    eager = Probabilities(model).eval()

    steps = {"pytorch": lambda x: eager(x), "onnxruntime": lambda x: onnx_model.probabilities(x)}
    totals = dict.fromkeys(steps, 0.0)
    names = list(steps)
    worst = 0.0
    with torch.inference_mode():
        for name in names:  # warm-up: first-call allocations and ORT's lazy initialisation
            steps[name](inputs[0])
        for _ in range(args.rounds):
            for i, x in enumerate(inputs):
                outputs = {}
                for name in names if i % 2 == 0 else names[::-1]:
                    t0 = time.perf_counter()
                    outputs[name] = steps[name](x)
                    totals[name] += time.perf_counter() - t0
                worst = max(worst, float((outputs["pytorch"] - outputs["onnxruntime"]).abs().max()))

    n = len(test) * args.rounds
    result = {
        "arch": args.arch, "img_size": args.size, "batch_size": args.batch_size, "images": len(test),
        "rounds": args.rounds, "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "torch_threads": torch.get_num_threads(), "ort_threads": args.threads or "default", "ort_spin": args.ort_spin, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "pytorch_img_s": n / totals["pytorch"], "onnxruntime_img_s": n / totals["onnxruntime"],
        "ratio_onnxruntime_over_pytorch": totals["pytorch"] / totals["onnxruntime"],
        "max_probability_difference": worst,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.arch} @ {args.size} px, batch {args.batch_size}, {len(test)} images × {args.rounds} rounds, fp32, "
          f"{result['cpus']} CPUs ({result['machine']}), torch {torch.__version__} with {result['torch_threads']} "
          f"threads, onnxruntime {result['onnxruntime']} with {result['ort_threads']} threads "
          f"(spinning {'on' if args.ort_spin else 'off'})")
    print(f"{'':12s} {'seconds':>8s} {'img/s':>8s}")
    for name in names:
        print(f"{name:12s} {totals[name]:8.2f} {n / totals[name]:8.1f}")
    print(f"onnxruntime ÷ pytorch throughput: {result['ratio_onnxruntime_over_pytorch']:.3f}; "
          f"largest probability difference {worst:.2e}")


if __name__ == "__main__":
    main()
