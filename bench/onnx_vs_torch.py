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
from pathlib import Path

import torch
from common import demo_test_set, interleaved, printer, random_checkpoint, scratch_folder  # noqa: E402  (puts the package on the path)

from aicoss_cli.data.loading import normalize
from aicoss_cli.data.tables import read_test
from aicoss_cli.models.checkpoint import model_from_checkpoint


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
    parser.add_argument("--threads", type=int, help="threads for both (default: each library's own)")
    parser.add_argument("--ort-spin", action=argparse.BooleanOptionalAction, default=False,
                        help="let ONNX Runtime's idle threads spin between runs (its default; off here, since a "
                             "spinning thread takes the core PyTorch runs on next)")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    from aicoss_cli.data.images import decode_batch
    from aicoss_cli.export.writer import Probabilities, export_checkpoint
    from aicoss_cli.infer.onnx_model import OnnxModel

    say = printer(args.json)
    root = args.data or demo_test_set(tmp / "demo", args.images, args.size, say)
    test = read_test(root)
    chunks = [test.paths[i:i + args.batch_size] for i in range(0, len(test), args.batch_size)]
    inputs = [normalize(decode_batch(chunk, [args.size])[0][0]).contiguous() for chunk in chunks]

    checkpoint = random_checkpoint(tmp / "model.safetensors", args.arch, args.size, test.classes, root)
    say(f"exporting {args.arch} @ {args.size} px to ONNX")
    exported = export_checkpoint(checkpoint, "onnx", tmp / "model.onnx", data=root)
    if args.threads:
        torch.set_num_threads(args.threads)
    onnx_model = OnnxModel.load(exported.path, threads=args.threads, spin=args.ort_spin)
    model, _ = model_from_checkpoint(checkpoint)
    eager = Probabilities(model).eval()

    steps = {"pytorch": lambda i: eager(inputs[i]), "onnxruntime": lambda i: onnx_model.probabilities(inputs[i])}
    worst = 0.0

    def compare(_, outputs) -> None:
        nonlocal worst
        worst = max(worst, float((outputs["pytorch"] - outputs["onnxruntime"]).abs().max()))

    interleaved(steps, 1, 1)  # warm-up: first-call allocations and ORT's lazy initialisation
    totals = interleaved(steps, len(inputs), args.rounds, after_batch=compare)

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
    for name in steps:
        print(f"{name:12s} {totals[name]:8.2f} {n / totals[name]:8.1f}")
    print(f"onnxruntime ÷ pytorch throughput: {result['ratio_onnxruntime_over_pytorch']:.3f}; "
          f"largest probability difference {worst:.2e}")


if __name__ == "__main__":
    main()
