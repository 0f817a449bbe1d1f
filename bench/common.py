"""What the bench scripts share: the package on the path, a scratch folder, a progress printer,
demo images, random-init checkpoints, and methods timed side by side batch by batch."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def scratch_folder(prefix: str = "aicoss-bench-") -> Iterator[Path]:
    """A temporary folder, removed afterwards whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def printer(quiet: bool) -> Callable[..., None]:
    """Progress lines on stderr (stdout stays for the result), or nothing with --json."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def demo_test_set(folder: Path, images: int, size: int, say: Callable[..., None]) -> Path:
    """A demo data root whose test split holds `images` images of `size` px (10 train images)."""
    from aicoss_cli.data.demo import build_demo_data

    say(f"building {images} demo images of {size} px in {folder}")
    return build_demo_data(folder, n_train=10, n_test=images, size=size, seed=0)


def random_checkpoint(path: Path, arch: str, size: int, classes: list[str], root: Path, seed: int = 0) -> Path:
    """A random-init checkpoint (throughput does not depend on the weights)."""
    import torch

    from aicoss_cli.models import build_model
    from aicoss_cli.models.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(seed)
    model = build_model(arch, len(classes), img_size=size)
    meta = CheckpointMeta(arch=arch, img_size=size, classes=classes, recipe_toml=f'[data]\nroot = "{root}"\n')
    save_checkpoint(path, model.state_dict(), meta)
    return path


def interleaved(steps: dict[str, Callable[[int], object]], n_batches: int, rounds: int,
                after_batch: Callable[[int, dict[str, object]], None] | None = None) -> dict[str, float]:
    """Seconds per method, every method running on batch i before any runs on batch i+1; the
    order flips from batch to batch so no method always finds the caches warmed by another.
    `after_batch(i, outputs)` sees what each method returned for batch i (e.g. to compare them)."""
    import torch

    totals = dict.fromkeys(steps, 0.0)
    names = list(steps)
    with torch.inference_mode():
        for _ in range(rounds):
            for i in range(n_batches):
                outputs = {}
                for name in names if i % 2 == 0 else names[::-1]:
                    t0 = time.perf_counter()
                    outputs[name] = steps[name](i)
                    totals[name] += time.perf_counter() - t0
                if after_batch is not None:
                    after_batch(i, outputs)
    return totals
