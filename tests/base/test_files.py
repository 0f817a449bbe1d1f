"""Writing files: a failed atomic write keeps the previous file; written files follow the umask."""

from __future__ import annotations

import os

import pytest

from aicoss_cli.base.files import atomic_path

from helpers import file_mode


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["last.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(mask, umask, tmp_path):
    import numpy as np
    import torch

    from aicoss_cli.base.files import write_text_atomic
    from aicoss_cli.data.submission import write_scores_csv
    from aicoss_cli.models.checkpoint import CheckpointMeta, save_checkpoint
    from aicoss_cli.train.prior import write_prior_csv

    umask(mask)
    expected = 0o666 & ~mask
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, CheckpointMeta("tiny_convnet", 32, ["a", "b"]))
    write_text_atomic(tmp_path / "b.toml", "x = 1\n")
    write_scores_csv(tmp_path / "c.csv", ["i"], ["a", "b"], np.array([[0.5, 0.25]]))
    write_prior_csv(tmp_path / "d.csv", ["a", "b"], [0.5, 0.25])
    for name in ("a.safetensors", "b.toml", "c.csv", "d.csv"):
        assert file_mode(tmp_path / name) == expected, (name, oct(file_mode(tmp_path / name)), oct(expected))
