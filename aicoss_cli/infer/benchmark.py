"""`aicoss benchmark-fp16`: the same ensemble over the same val images in fp32 and in half
precision, timed with the one forward loop, with the val mAP of both: the seed's fp16 table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from aicoss_cli.base.errors import UserError
from aicoss_cli.base.runtime import half_dtype, make_runtime
from aicoss_cli.evaluation.metrics import mean_average_precision
from aicoss_cli.infer.forward import MemberSource, combine, forward, load_members, member_meta
from aicoss_cli.infer.members import check_members, val_split


def run_benchmark(checkpoints: Sequence[Path], *, data: Path | None = None, limit: int | None = None,
                  batch_size: int = 64, num_workers: int | None = None, device: str = "auto",
                  progress=None) -> dict:
    """The same ensemble over the same val images in fp32 and in half precision (after a warm-up of
    each): time, img/s and val mAP of both, their differences in %, and the largest |Δ probability|."""
    if not checkpoints:
        raise UserError("benchmark-fp16 needs at least one CHECKPOINT")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be ≥ 1 (got {limit})")
    sources = [MemberSource(Path(p)) for p in checkpoints]
    metas = [(str(s.path), member_meta(s.path)) for s in sources]
    check_members(metas)
    ref_src, ref = metas[0]
    root = ref.resolve_data_root(data, ref_src)
    val = val_split(ref, root, ref_src)
    n = len(val) if limit is None else min(limit, len(val))
    paths, targets = val.paths[:n], val.targets[:n]

    rt = make_runtime(device, "fp32", num_workers)
    half = half_dtype(rt.device)
    notes = list(rt.notes)
    if rt.device.type != "cuda":
        notes.append("fp16 needs CUDA: the half-precision column is bf16 on the CPU")
    members = load_members(sources, rt, progress=progress)
    warm = paths[: min(len(paths), 2 * batch_size)]
    for dtype in (None, half):
        run = rt.with_precision(dtype)
        forward(members, warm, run, batch_size, progress=progress, what=f"warm-up ({run.precision})")
    timings = {}
    for label, dtype in (("fp32", None), ("half", half)):
        run = rt.with_precision(dtype)
        run.synchronize()
        t0 = time.perf_counter()
        probs = forward(members, paths, run, batch_size, progress=progress,
                        what=f"{run.precision}: {len(paths)} images × {len(members)} members")
        run.synchronize()
        seconds = time.perf_counter() - t0
        ens = combine(probs)
        timings[label] = {"seconds": seconds, "img_per_sec": len(paths) / seconds,
                          "val_map": mean_average_precision(targets, ens.numpy()), "probs": ens}

    def pct(new: float, old: float) -> float:
        return (new - old) / old * 100.0 if old else float("nan")

    a, b = timings["fp32"], timings["half"]
    return {
        "device": rt.describe().split(", ")[0],
        "half_dtype": rt.with_precision(half).precision,
        "members": [{"path": s, "arch": m.arch, "img_size": m.img_size} for s, m in metas],
        "images": len(paths),
        "batch_size": batch_size,
        "loader": rt.loader,
        "fp32": {k: v for k, v in a.items() if k != "probs"},
        "half": {k: v for k, v in b.items() if k != "probs"},
        "diff_pct": {"seconds": pct(b["seconds"], a["seconds"]), "img_per_sec": pct(b["img_per_sec"], a["img_per_sec"]),
                     "val_map": pct(b["val_map"], a["val_map"])},
        "max_abs_prob_diff": float((a["probs"] - b["probs"]).abs().max()),
        "notes": notes,
    }
