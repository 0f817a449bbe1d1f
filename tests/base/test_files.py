"""The one atomic write: a failed write keeps the previous file."""

from __future__ import annotations

import os

import pytest

from aicoss_cli.base.files import atomic_path


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "previous"
    assert os.listdir(tmp_path) == ["last.safetensors"]
