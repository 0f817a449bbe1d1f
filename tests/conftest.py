"""Shared fixtures: a tiny demo data set, tiny recipes, checkpoints and trained runs, and the real CLI
run in-process. Data and trained runs are built once per session and are read-only: a test that
changes one works on a copy (`data_copy`, `runs`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import TINY_RECIPE, CliResult, cli_exit_code, cli_in_process, only_run_dir, save_random_checkpoint

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("COLUMNS", "200")  # Rich tables and one-line errors must not wrap in captured output


@pytest.fixture
def run_cli(capsys):
    """Run `aicoss ARGS...` through its real entry point (exit code, stdout, stderr)."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = cli_exit_code(*args)
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
def data_copy(demo_root, tmp_path) -> Path:
    """A private copy of the demo data that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


@pytest.fixture
def umask():
    """`umask(value)` sets the process umask for one test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a tiny recipe (tiny_convnet by default) and return its path."""

    def write(root: Path, *, arch: str = "tiny_convnet", loss: str = "bce", epochs: int = 1, policy: str = "weak",
              name: str = "tiny.toml", extra: str = "") -> Path:
        path = tmp_path / name
        path.write_text(TINY_RECIPE.format(arch=arch, loss=loss, epochs=epochs, policy=policy, root=root) + extra)
        return path

    return write


@pytest.fixture
def random_checkpoint(demo_root, tmp_path) -> Path:
    """A random-init tiny_convnet checkpoint of the demo data, alone in its folder (a test may edit it)."""
    return save_random_checkpoint(tmp_path / "ckpt" / "model.safetensors", demo_root)


def _train(demo_root: Path, base: Path, epochs: int, out: Path, *extra: str) -> None:
    """`aicoss train` of the tiny recipe (no augmentation) in this process; it must succeed."""
    recipe = base / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(arch="tiny_convnet", loss="bce", epochs=epochs, policy="none", root=demo_root))
    result = cli_in_process("train", recipe, "--out", out, *extra)
    assert result.code == 0, result.stderr


@pytest.fixture(scope="session")
def ensemble_runs(demo_root, tmp_path_factory) -> dict[str, Path]:
    """Two 1-epoch runs under one runs folder: tiny_convnet at 32 px and at 48 px (another seed), as
    {"a32": best checkpoint, "b48": best checkpoint, "runs": the folder} (read-only for tests)."""
    base = tmp_path_factory.mktemp("ensemble")
    out = {}
    for name, sets in (("a32", []), ("b48", ["--set", "model.img_size=48", "--set", "runtime.seed=5"])):
        _train(demo_root, base, 1, base / "staging" / name, "--set", f"name={name}", *sets)
        run = only_run_dir(base / "staging" / name)
        target = base / "runs" / name / run.name
        target.parent.mkdir(parents=True)
        run.rename(target)
        out[name] = target / "best.safetensors"
    out["runs"] = base / "runs"
    return out


@pytest.fixture(scope="session")
def two_runs(demo_root, tmp_path_factory) -> list[Path]:
    """Two finished 2-epoch runs of tiny_convnet that differ in lr (read-only for the tests)."""
    base = tmp_path_factory.mktemp("report_runs")
    for lr in ("3e-3", "1e-2"):
        _train(demo_root, base, 2, base / "runs", "--set", f"optim.lr={lr}")
    runs = sorted(p for p in (base / "runs" / "tiny").iterdir() if p.is_dir())
    assert len(runs) == 2
    return runs


@pytest.fixture
def runs(two_runs, tmp_path) -> list[Path]:
    """Copies of the two runs that a test may change."""
    copies = []
    for run in two_runs:
        copies.append(tmp_path / "runs" / "tiny" / run.name)
        shutil.copytree(run, copies[-1])
    return copies
