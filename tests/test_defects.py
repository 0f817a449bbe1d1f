"""Issue 15, "what a new user tripped over": one test (or a few) per defect, each failing before its fix.

The numbers in the section titles are the issue's items."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers import assert_one_line_error


@pytest.fixture
def umask():
    """`umask(value)` sets the process umask for one test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- 1: file modes follow the umask


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(mask, umask, tmp_path):
    import numpy as np
    import torch

    from aicoss_cli.checkpoint import CheckpointMeta, save_checkpoint, write_text_atomic
    from aicoss_cli.inference import write_scores_csv
    from aicoss_cli.prior import write_prior_csv

    umask(mask)
    expected = 0o666 & ~mask
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, CheckpointMeta("tiny_convnet", 32, ["a", "b"]))
    write_text_atomic(tmp_path / "b.toml", "x = 1\n")
    write_scores_csv(tmp_path / "c.csv", ["i"], ["a", "b"], np.array([[0.5, 0.25]]))
    write_prior_csv(tmp_path / "d.csv", ["a", "b"], [0.5, 0.25])
    for name in ("a.safetensors", "b.toml", "c.csv", "d.csv"):
        assert mode(tmp_path / name) == expected, (name, oct(mode(tmp_path / name)), oct(expected))


def test_the_demo_folder_follows_the_umask(umask, tmp_path, run_cli):
    umask(0o022)
    result = run_cli("demo-data", tmp_path / "demo", "--n-train", "10", "--n-test", "2", "--size", "16")
    assert result.code == 0, result.stderr
    root = tmp_path / "demo"
    assert mode(root) == 0o755 and mode(root / "train") == 0o755
    assert mode(root / "train.csv") == 0o644 and mode(next((root / "train").iterdir())) == 0o644
