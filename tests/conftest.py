"""Shared fixtures: a tiny demo data set, tiny recipes, and the real CLI run in-process."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import TINY_RECIPE

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("COLUMNS", "200")  # Rich tables and one-line errors must not wrap in captured output



@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `aicoss ARGS...` through its real entry point (exit code, stdout, stderr)."""

    def run(*args: str | Path) -> CliResult:
        from aicoss_cli.cli.app import main

        monkeypatch.setattr(sys, "argv", ["aicoss", *map(str, args)])
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """240 train + 40 test digit mosaics of 32×32 (built once per session; read-only for tests)."""
    from aicoss_cli.data.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("data") / "demo", n_train=240, n_test=40, size=32, seed=0)


@pytest.fixture(scope="session")
def demo_root_partial(tmp_path_factory) -> Path:
    """Like demo_root, with 30 % of the train labels not annotated (-1)."""
    from aicoss_cli.data.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("data") / "partial", n_train=240, n_test=40, size=32, seed=1,
                           unannotated=0.3)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a tiny recipe (tiny_convnet by default) and return its path."""

    def write(root: Path, *, arch: str = "tiny_convnet", loss: str = "bce", epochs: int = 1, policy: str = "weak",
              name: str = "tiny.toml", extra: str = "") -> Path:
        path = tmp_path / name
        path.write_text(TINY_RECIPE.format(arch=arch, loss=loss, epochs=epochs, policy=policy, root=root) + extra)
        return path

    return write
