"""What does the symbolic-link check of `img_path` cost on a train.csv of the seed's size?

One run, one table of N rows (default 65,000, the AICOSS train.csv) over real files in two
folders, read by `data._resolve_paths` (the root and each folder resolved once, one lstat per
row) and by the check it replaced (string work only: `..` caught, links not followed), rounds
alternating; then the same table where every image is a symbolic link inside the root (the
worst case: one realpath per row). Prints the median seconds of each and the ratios.

    python bench/data_paths.py
    python bench/data_paths.py --rows 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aicoss_cli.data.tables import _resolve_paths


def string_only(frame: pd.DataFrame, root: Path, csv: Path) -> list[str]:
    """The check before links were followed: normpath and a prefix test, no system call."""
    base = os.path.abspath(root)
    out = []
    for rel in frame["img_path"].tolist():
        full = os.path.normpath(os.path.join(base, rel))
        if not full.startswith(base + os.sep):
            raise ValueError(rel)
        out.append(full)
    return out


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="aicoss-bench-paths-"))
    try:
        for folder in ("train", "store"):
            (tmp / folder).mkdir()
        rels = []
        for i in range(args.rows):
            name = f"TRAIN_{i:05d}.jpg"
            (tmp / "train" / name).touch()
            rels.append(f"./train/{name}")
        frame = pd.DataFrame({"img_path": rels})
        csv = tmp / "train.csv"
        plain = {"links followed": [], "string only": []}
        for _ in range(args.rounds):
            plain["links followed"].append(timed(_resolve_paths, frame, tmp, csv))
            plain["string only"].append(timed(string_only, frame, tmp, csv))
        for i in range(args.rows):  # every image a link to a file elsewhere in the root
            name = f"TRAIN_{i:05d}.jpg"
            (tmp / "train" / name).rename(tmp / "store" / name)
            (tmp / "train" / name).symlink_to(tmp / "store" / name)
        linked = [timed(_resolve_paths, frame, tmp, csv) for _ in range(args.rounds)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    new, old, worst = (statistics.median(v) for v in (plain["links followed"], plain["string only"], linked))
    print(f"{args.rows} rows, median of {args.rounds} rounds")
    print(f"  string only (before)          {old:8.4f} s")
    print(f"  links followed, no links      {new:8.4f} s   ratio {new / old:5.2f}")
    print(f"  links followed, every a link  {worst:8.4f} s   ratio {worst / old:5.2f}")


if __name__ == "__main__":
    main()
