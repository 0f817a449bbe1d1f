"""Helpers shared by the tests: paths, a tiny recipe, random checkpoints, CSV reading, checks.

Fixtures live in conftest.py; plain functions and constants live here, so tests import them from
one module rather than from conftest or from one another.
"""

from __future__ import annotations

import csv
import json
import signal
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


TINY_RECIPE = """\
name = "tiny"
description = "test recipe: a CPU-instant model"

[model]
arch = "{arch}"
pretrained = false
img_size = 32

[loss]
name = "{loss}"

[optim]
epochs = {epochs}
batch_size = 32
lr = 3e-3
min_lr = 1e-4
weight_decay = 0.0

[augment]
policy = "{policy}"

[data]
root = "{root}"
val_fraction = 0.2
split_seed = 78

[runtime]
seed = 3
precision = "fp32"
device = "cpu"
num_workers = 0
"""


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def cli_exit_code(*args: str | Path) -> int:
    """Run `aicoss ARGS...` through its real entry point in this process; its exit code."""
    from aicoss_cli.cli.app import main

    saved = sys.argv
    sys.argv = ["aicoss", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def cli_in_process(*args: str | Path) -> CliResult:
    """`cli_exit_code` with stdout and stderr captured, for session fixtures (capsys is per test)."""
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_exit_code(*args)
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def only_run_dir(out: Path) -> Path:
    """The one run folder a single `aicoss train --out OUT` created."""
    runs = [p for p in out.glob("*/*") if (p / "recipe.toml").is_file()]
    assert len(runs) == 1, runs
    return runs[0]


def save_random_checkpoint(path: Path, root: Path, *, arch: str = "tiny_convnet", img_size: int = 32, seed: int = 0,
                           classes: list[str] | None = None, split_seed: int = 78, val_fraction: float = 0.2) -> Path:
    """A random-init checkpoint with the metadata `aicoss train` writes (split verified on `root`)."""
    import torch

    from aicoss_cli.data.splits import split_fingerprint, split_indices
    from aicoss_cli.data.tables import read_train
    from aicoss_cli.models import build_model
    from aicoss_cli.models.checkpoint import CheckpointMeta, save_checkpoint

    table = read_train(root)
    classes = classes or table.classes
    torch.manual_seed(seed)
    model = build_model(arch, len(classes), img_size=img_size)
    _, val = split_indices(table.labels, "random", val_fraction, split_seed)
    split = {"kind": "random", "val_fraction": val_fraction, "split_seed": split_seed, "n_rows": len(table),
             "n_val": int(len(val)), "val_fingerprint": split_fingerprint(table.ids, val)}
    meta = CheckpointMeta(arch=arch, img_size=img_size, classes=classes, recipe_toml=f'[data]\nroot = "{root}"\n',
                          epoch=1, val_map=None, split=split)
    save_checkpoint(path, model.state_dict(), meta)
    return path


def read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(header, ids, values) of a scores CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code == 2, (result.stdout, result.stderr)
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".probe"))] if folder.is_dir() else []


def state_progress(run: Path) -> dict | None:
    """Progress stored in train_state.safetensors (read from its header, no tensors)."""
    path = run / "train_state.safetensors"
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return json.loads(header["__metadata__"]["progress"])



def help_in_fresh_python(*argv: str, also_import: tuple[str, ...] = ()) -> tuple[str, set[str]]:
    """`aicoss ARGV` (a --help) run by `main()` in a fresh interpreter, then the modules of
    `also_import` imported: its stdout, and the top-level names of every module then loaded."""
    code = (f"import json, sys\nsys.argv = ['aicoss', *{list(argv)!r}]\nfrom aicoss_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            + "".join(f"import {name}\n" for name in also_import)
            + "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout, set(json.loads(result.stderr.strip().splitlines()[-1]))

def kill_when_saved(proc, runs, epoch: int, step: int, timeout: float) -> dict | None:
    """SIGKILL `proc` (a training) once the first folder of `runs()` holds a saved state at `epoch`
    (0-based), step ≥ `step`; that state's progress, or None when the run ended (or `timeout`
    seconds passed: it is killed) first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        found = runs()
        progress = state_progress(found[0]) if found else None
        if progress and progress["epoch"] == epoch and progress["step"] >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return progress
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return None


EXACT = """
[runtime]
seed = 3
precision = "fp32"
device = "cpu"
num_workers = 0
deterministic = true
checkpoint_every = 1
"""


def exact_recipe(write_recipe, root, epochs=2):
    # resnet18_mldecoder: batch norm and dropout, so RNG and buffers must come back exactly
    path = write_recipe(root, arch="resnet18_mldecoder", epochs=epochs)
    text = path.read_text()
    path.write_text(text[: text.index("[runtime]")] + EXACT.lstrip())
    return path


def pil_pixels(path, size: int | None = None):
    """The pixels aicoss must give, computed with PIL alone (an independent reference of the one
    decoder): RGB, a JPEG drafted at the scale PIL picks for size×size, a bilinear resize;
    (3, H, W) uint8."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    """A CSV of a header and rows, written with the csv module."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def random_scores(seed: int, n: int = 80, k: int = 6, unannotated: float = 0.0):
    """Scores to threshold: targets (with -1 where unannotated) and probabilities that carry some signal, rounded to
    two decimals so there are ties at the thresholds."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.int8)
    p = np.clip(0.35 * y + rng.random((n, k)) * 0.65, 0, 1).round(2)
    if unannotated:
        y[rng.random((n, k)) < unannotated] = -1
    return y, p


def assert_picture(path: Path) -> None:
    """A whole PNG of at least 800×300 pixels (the report's pictures)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes the whole image
        assert img.format == "PNG" and img.width >= 800 and img.height >= 300, (path, img.size)


def tune_recipe(tmp_path: Path, root: Path, *, policy: str = "none", min_lr: float = 1e-4, epochs: int = 2,
                arch: str = "tiny_convnet") -> Path:
    """The tests' tiny recipe for tune with a weight decay a log scale can hold, so trial 0 is the recipe."""
    path = tmp_path / "tiny.toml"
    text = TINY_RECIPE.format(arch=arch, loss="bce", epochs=epochs, policy=policy, root=root)
    path.write_text(text.replace("weight_decay = 0.0", "weight_decay = 1e-4").replace("min_lr = 1e-4",
                                                                                      f"min_lr = {min_lr}"))
    return path


def file_mode(path: Path) -> int:
    """The permission bits of a file or folder."""
    return stat.S_IMODE(path.stat().st_mode)


def edit_metadata(path: Path, **changes: str | None) -> Path:
    """Rewrite a checkpoint's metadata (None removes a key), as a hand edit would."""
    from safetensors.torch import load_file, save_file

    from aicoss_cli.base.files import read_safetensors

    meta = read_safetensors(path, tensors=False)[1]
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(path)), str(path), metadata=meta)
    return path


def read_rows(path: Path) -> list[list[str]]:
    """Every row of a CSV, the header first, as the csv module reads them."""
    with open(path, newline="") as f:
        return list(csv.reader(f))


def read_metrics(run: str | Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as text."""
    with open(Path(run) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_state_tensors(run: Path) -> dict:
    """The tensors of a run's train_state.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(run / "train_state.safetensors"))


def read_trials(study_dir: Path) -> list[dict]:
    """A study's trials.csv, its params column parsed."""
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["params"] = json.loads(r["params"])
    return rows
