"""`aicoss export` never loses a user's files: --overwrite replaces only what the export writes, the
files follow the umask, a full disk or a read-only folder is one line with nothing left behind, the
opset asked for is the opset written (or refused with the range), and a file that is not ONNX is
named for what it is."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx  # the export extra: installed with the dev environment
import pytest

from helpers import assert_one_line_error, leftovers, save_random_checkpoint
from sandbox import assert_one_line, run_aicoss


def export_ok(run_cli, *args) -> str:
    result = run_cli("export", *map(str, args))
    assert result.code == 0, (result.stdout, result.stderr)
    return result.stdout


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def r18(demo_root, tmp_path) -> Path:
    """A checkpoint whose backbone is a timm model (resnet18), in a run-like folder."""
    return save_random_checkpoint(tmp_path / "run" / "best.safetensors", demo_root, arch="resnet18_mldecoder")


def test_overwrite_never_removes_a_file_the_export_does_not_write(run_cli, r18, tmp_path):
    project = tmp_path / "project"
    (project / "data" / "train").mkdir(parents=True)
    (project / "data" / "train.csv").write_text("img_id,img_path,a\n")
    (project / "data" / "train" / "x.jpg").write_bytes(b"\xff\xd8 an image")
    (project / "notes.txt").write_text("mine")
    before = tree(project)
    result = run_cli("export", r18, "--format", "safetensors-timm", "--out", project, "--overwrite")
    assert_one_line_error(result, str(project), "'data'", "model.safetensors", "config.json")
    assert tree(project) == before

    run = r18.parent  # the run folder itself: its checkpoint and metrics must survive
    (run / "metrics.csv").write_text("epoch,val_map\n1,0.5\n")
    before = tree(run)
    result = run_cli("export", r18, "--format", "safetensors-timm", "--out", run, "--overwrite")
    assert_one_line_error(result, str(run), "'best.safetensors'")
    assert tree(run) == before

    folder = tmp_path / "timm"  # a folder holding only what an export writes: replaced file by file
    export_ok(run_cli, r18, "--format", "safetensors-timm", "--out", folder)
    first = (folder / "model.safetensors").read_bytes()
    export_ok(run_cli, r18, "--format", "safetensors-timm", "--out", folder, "--overwrite", "--fp16")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert len((folder / "model.safetensors").read_bytes()) < 0.6 * len(first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_timm_folder_and_its_files_follow_the_umask(run_cli, r18, tmp_path):
    old = os.umask(0o002)
    try:
        export_ok(run_cli, r18, "--format", "safetensors-timm", "--out", tmp_path / "timm")
    finally:
        os.umask(old)
    folder = tmp_path / "timm"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o664, name


@pytest.mark.parametrize("opset", [7, 9, 17])
def test_an_opset_the_exporter_cannot_write_is_refused_with_its_range(run_cli, demo_root, tmp_path, opset):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    newest = onnx.defs.onnx_opset_version()
    assert_one_line_error(run_cli("export", checkpoint, "--opset", str(opset)), "--opset", f"from 18 to {newest}",
                          f"got {opset}")
    assert not checkpoint.with_suffix(".onnx").exists()


def test_the_opset_asked_for_is_the_opset_written(run_cli, demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    export_ok(run_cli, checkpoint, "--opset", "19")
    model = onnx.load(str(checkpoint.with_suffix(".onnx")))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [19]


def test_a_torchscript_file_named_onnx_is_named_for_what_it_is(run_cli, demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    export_ok(run_cli, checkpoint, "--format", "torchscript", "--out", tmp_path / "model.onnx")
    assert_one_line_error(run_cli("predict", tmp_path / "model.onnx", "--data", demo_root, "--out", tmp_path / "p.csv"),
                          "model.onnx", "TorchScript", "not an ONNX model")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("fmt, arch, out", [("torchscript", "tiny_convnet", "model.pt"),
                                            ("safetensors-timm", "resnet18_mldecoder", "model_timm")])
def test_a_full_disk_is_one_line_and_leaves_no_temporary(demo_root, tmp_path, fmt, arch, out):
    """A 64 KiB tmpfs (a real full disk, in a mount namespace of its own): the export is checked,
    then cannot be written; one line, exit 2, nothing left on that disk."""
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root, arch=arch)
    disk = tmp_path / "disk"
    disk.mkdir()
    ran = run_aicoss(["export", checkpoint, "--format", fmt, "--out", disk / out], cwd=tmp_path, full=disk,
                     after=f"ls -A {disk}")
    assert_one_line(ran, str(disk / out), "No space left on device")
    assert ran.after.split() == []


def test_a_run_folder_on_a_read_only_file_system_is_refused_before_the_export(demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "run" / "best.safetensors", demo_root)
    ran = run_aicoss(["export", checkpoint, "--format", "torchscript"], cwd=tmp_path, read_only=[checkpoint.parent])
    message = assert_one_line(ran, str(checkpoint.with_suffix(".pt")), "cannot be written")
    assert "Read-only file system" in message or "not writable" in message
    assert leftovers(checkpoint.parent) == [] and not checkpoint.with_suffix(".pt").exists()

