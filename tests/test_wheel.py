"""A built wheel holds every module of every subpackage and the bundled recipes, and finds them by
name from any folder, with no source checkout on the path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow  # builds a wheel with pip in a fresh process
def test_a_built_wheel_lists_and_finds_the_bundled_recipes(tmp_path):
    import shutil
    import zipfile

    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "aicoss_cli", source / "aicoss_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "recipes", source / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("aicoss-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = set(archive.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "aicoss_cli").rglob("*.py")}
    assert sources <= names, sorted(sources - names)  # every module, in every subpackage
    assert {f"aicoss_cli/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.toml")} <= names
    elsewhere = tmp_path / "elsewhere"  # no recipes/ folder here, no source checkout on the path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "aicoss_cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=120)

    listed = run("recipes")
    assert listed.returncode == 0, listed.stderr
    assert "tresnet_xl_pasl" in listed.stdout and str(site / "aicoss_cli" / "recipes") in listed.stdout
    found = run("validate", "tresnet_xl_pasl")
    assert found.returncode == 0, found.stderr
    assert str(site / "aicoss_cli" / "recipes" / "tresnet_xl_pasl.toml") in found.stdout
