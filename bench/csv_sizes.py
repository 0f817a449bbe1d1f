"""How long do the scores CSVs take at a large label set?

Random probabilities and 0/1 labels of N images × K classes (default 10,000 × 500: a big test set
of a large label set), written by the one scores writer (`write_scores_csv`, as predict, ensemble
and every submission write them) and read back by the one reader of each kind, then scored as
`aicoss score` does (`score_files`: the two reads, the id and class matching, mAP, F1 at 0.5).
Prints the median seconds of each step over the rounds and the cells per second.

    python bench/csv_sizes.py
    python bench/csv_sizes.py --images 2000 --classes 60 --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import numpy as np
from common import scratch_folder  # puts the package on the path

from aicoss_cli.data.submission import read_labels_csv, read_probabilities_csv, write_scores_csv
from aicoss_cli.evaluation.score import score_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    ids = [f"TEST_{i:05d}" for i in range(args.images)]
    classes = [f"class_{j}" for j in range(args.classes)]
    probs = rng.random((args.images, args.classes), dtype=np.float32)
    labels = (rng.random((args.images, args.classes)) < 0.05).astype(np.int8)
    labels[0] = 1  # every class has a positive

    times: dict[str, list[float]] = {"write predictions": [], "read predictions": [], "read labels": [],
                                     "score (both reads + metrics)": []}
    with scratch_folder() as tmp:
        pred, truth = tmp / "pred.csv", tmp / "labels.csv"
        with truth.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["img_id", *classes])
            writer.writerows([i, *row] for i, row in zip(ids, labels.tolist()))
        steps = {"write predictions": lambda: write_scores_csv(pred, ids, classes, probs),
                 "read predictions": lambda: read_probabilities_csv(pred),
                 "read labels": lambda: read_labels_csv(truth),
                 "score (both reads + metrics)": lambda: score_files(pred, truth)}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        size_mb = pred.stat().st_size / 1e6

    cells = args.images * args.classes
    print(f"{args.images} images x {args.classes} classes ({cells / 1e6:.1f} M cells, predictions CSV "
          f"{size_mb:.0f} MB), median of {args.rounds} rounds")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"  {name:<30} {seconds:6.2f} s   {cells / seconds / 1e6:5.2f} M cells/s")


if __name__ == "__main__":
    main()
