"""The same image under two ids: files with identical bytes (a content hash), found cheaply, since
only files that share a size are read and hashed. A copy on both sides of the train/val split lets
val mAP score an image the model trained on."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from typing import Sequence


def _digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").digest()
    except OSError:
        return None


def same_images(paths: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs of rows (i, j), i < j, whose files hold the same bytes: in a group of n copies, the
    first with each of the others (n − 1 pairs). Unreadable files are left out."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        try:
            by_size[os.path.getsize(path)].append(i)
        except OSError:
            continue
    pairs = []
    for rows in by_size.values():
        if len(rows) < 2:
            continue
        by_digest: dict[bytes, list[int]] = defaultdict(list)
        for i in rows:
            digest = _digest(paths[i])
            if digest is not None:
                by_digest[digest].append(i)
        for group in by_digest.values():
            pairs += [(group[0], j) for j in group[1:]]
    return sorted(pairs)


def describe_same_images(ids: Sequence[str], pairs: Sequence[tuple[int, int]], val_rows: Sequence[int]) -> str:
    """A warning naming the pairs (those that straddle the val split first) and how many straddle it."""
    val = {int(i) for i in val_rows}
    straddle = [(i, j) for i, j in pairs if (i in val) != (j in val)]
    shown = ", ".join(f"{ids[i]!r} = {ids[j]!r}" for i, j in [*straddle, *(p for p in pairs if p not in straddle)][:3])
    n = len(straddle)
    return (f"{len(pairs)} pair{'s' if len(pairs) != 1 else ''} of ids hold the same image (identical files: {shown}"
            f"{', ...' if len(pairs) > 3 else ''}); {n} of them straddle{'s' if n == 1 else ''} the val split (one id "
            "in train, one in val), so val mAP scores images the model trained on: remove the copies")
