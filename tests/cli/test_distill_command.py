"""`aicoss distill`: a student trained end to end in both modes, its checkpoint naming its
teachers, `aicoss report` showing it beside them, and every bad input a one-line error before
any compute (no run folder made)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, only_run_dir, save_random_checkpoint


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def teachers(demo_root, tmp_path) -> list[Path]:
    """Two random-init teachers of the demo classes and split, at two input sizes."""
    return [save_random_checkpoint(tmp_path / "t1.safetensors", demo_root, seed=1),
            save_random_checkpoint(tmp_path / "t2.safetensors", demo_root, seed=2, img_size=48)]


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_distill_trains_a_student_that_records_its_teachers(run_cli, demo_root, write_recipe, teachers, tmp_path,
                                                            mode):
    from aicoss_cli.models.checkpoint import read_meta

    result = run_cli("distill", write_recipe(demo_root, epochs=1), "--teacher", teachers[0], "--teacher",
                     teachers[1], "--mode", mode, "--unlabeled", "test", "--weight", "0.8", "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    run = only_run_dir(tmp_path / "runs")
    assert "teacher: weighted mean of 2 members" in result.stdout
    student = next(line for line in result.stdout.splitlines() if "student (" in line)
    assert [cell.strip() for cell in student.split("│")][2:4] == ["tiny_convnet", "32"], student  # its own size
    meta = json.loads(read_meta(run / "best.safetensors").extra["distill"])
    assert meta["teachers"] == [{"file": t.name, "sha256": sha256(t), "weight": 0.5} for t in teachers]
    record = json.loads((run / "distill.json").read_text())
    assert meta["ensemble_val_map"] == record["val_map"] and 0 <= record["val_map"] <= 1
    assert record["mode"] == mode and record["weight"] == 0.8 and record["n_unlabeled"] == 40
    assert [m["img_size"] for m in record["members"]] == [32, 48]
    assert (run / "distill_cache.safetensors").is_file() == (mode == "cached")
    assert "[distill]" in (run / "recipe.toml").read_text() and (run / "submission.csv").is_file()
    # the run's recipe.toml reproduces it: resuming the finished run needs no flag
    again = run_cli("train", "--resume", run)
    assert again.code == 0 and "already complete" in again.stdout


def test_report_shows_a_distilled_run_beside_its_teachers(run_cli, demo_root, write_recipe, teachers, tmp_path):
    assert run_cli("distill", write_recipe(demo_root), "--teacher", teachers[0], "--teacher", teachers[1],
                   "--out", tmp_path / "runs").code == 0
    run = only_run_dir(tmp_path / "runs")
    report = run_cli("report", run, "--out", tmp_path / "report", "--json")
    assert report.code == 0, report.stderr
    (entry,) = json.loads(report.stdout)["distilled"]
    record = json.loads((run / "distill.json").read_text())
    assert entry["teachers"]["val_map"] == record["val_map"]
    assert entry["student"]["val_map"] == pytest.approx(json.loads((run / "run.json").read_text())["best_val_map"], abs=1e-6)
    assert (tmp_path / "report" / "ensemble_tradeoff.png").is_file()
    table = run_cli("report", run, "--out", tmp_path / "report")
    assert "t1.safetensors" in table.stdout and "teacher: weighted mean of 2 members" in table.stdout

    # distill.json is read as an untrusted file: a damaged field is one line naming the file and the key
    for key, value, needle in (("weight", 1.5, "'members[1].weight' must be a number in [0, 1] (got 1.5)"),
                               ("val_map", float("nan"), "'members[1].val_map' must be null or a number in [0, 1]"),
                               ("img_per_s", -3, "'members[1].img_per_s' must be a finite number > 0")):
        damaged = json.loads(json.dumps(record))
        damaged["members"][1][key] = value
        (run / "distill.json").write_text(json.dumps(damaged))
        assert_one_line_error(run_cli("report", run, "--out", tmp_path / "report"), "distill.json", needle)


def test_teachers_from_a_run_folder_and_a_spec(run_cli, demo_root, write_recipe, teachers, tmp_path):
    """A run folder teaches with its kept checkpoint; a spec with its weights (normalised); --set
    reaches the [distill] table that the options make."""
    assert run_cli("train", write_recipe(demo_root), "--out", tmp_path / "members").code == 0
    member_run = only_run_dir(tmp_path / "members")
    spec = tmp_path / "spec.toml"
    spec.write_text('[[member]]\npath = "t1.safetensors"\nweight = 3\n[[member]]\npath = "t2.safetensors"\n')
    result = run_cli("distill", write_recipe(demo_root), "--teacher", member_run, "--teacher", spec, "--set", "distill.weight=1",
                     "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    record = json.loads((only_run_dir(tmp_path / "runs") / "distill.json").read_text())
    assert record["weight"] == 1.0
    assert [Path(m["path"]).name for m in record["members"]] == ["best.safetensors", "t1.safetensors",
                                                                 "t2.safetensors"]
    assert [m["weight"] for m in record["members"]] == pytest.approx([0.2, 0.6, 0.2])


# --------------------------------------------------------------------------- bad input


def other_classes(demo_root: Path, tmp_path: Path) -> Path:
    classes = [f"c{i}" for i in range(10)]
    return save_random_checkpoint(tmp_path / "other.safetensors", demo_root, classes=classes)


def broken_image_list(demo_root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "list.csv").write_text("img_id,img_path\nx1,./bad.jpg\n")
    return folder / "list.csv"


def train_image_list(demo_root: Path, tmp_path: Path) -> Path:
    """A list whose image has the id of a train.csv image."""
    import shutil

    from aicoss_cli.data.tables import read_train

    table = read_train(demo_root)
    shutil.copyfile(table.paths[0], tmp_path / "copy.jpg")
    (tmp_path / "train_as_unlabeled.csv").write_text(f"img_id,img_path\n{table.ids[0]},./copy.jpg\n")
    return tmp_path / "train_as_unlabeled.csv"


@pytest.mark.parametrize("case, needles", [
    ("other classes than the data", ["other.safetensors", "10 classes"]),
    ("other classes among the teachers", ["other.safetensors", "class list differs"]),
    ("not a checkpoint", ["notes.safetensors", "not a readable .safetensors"]),
    ("an onnx teacher", ["model.onnx", "cannot teach"]),
    ("a folder that is not a run", ["not a run folder"]),
    ("a cross-validation folder", ["cv5", "cross-validation folder cannot teach"]),
    ("a cross-validation folder in a spec", ["cv5", "cross-validation folder cannot teach"]),
    ("a missing teacher", ["nowhere.safetensors", "teacher not found"]),
    ("another val split", ["validated on another split", "split_seed 7", "fingerprint"]),
    ("another exif_transpose", ["exif_transpose = false", "the student's true"]),
    ("weight above 1", ["--weight", "less than or equal to 1"]),
    ("cross-validation folds", ["[data] folds", "teachers' own single split"]),
    ("weight below 0 in the recipe", ["[distill] weight", "-0.1"]),
    ("no teacher", ["no teacher", "--teacher"]),
    ("an unlabeled image that does not decode", ["list.csv", "1 of 1 images cannot be used"]),
    ("an unlabeled image of train.csv", ["train_as_unlabeled.csv", "also in"]),
])
def test_bad_input_is_one_line_before_any_compute(run_cli, demo_root, write_recipe, teachers, tmp_path, case,
                                                  needles):
    recipe = write_recipe(demo_root)
    args = ["--teacher", teachers[0]]
    if case == "other classes than the data":
        args = ["--teacher", other_classes(demo_root, tmp_path)]
    elif case == "other classes among the teachers":
        args += ["--teacher", other_classes(demo_root, tmp_path)]
    elif case == "not a checkpoint":
        (tmp_path / "notes.safetensors").write_text("not a checkpoint")
        args = ["--teacher", tmp_path / "notes.safetensors"]
    elif case == "an onnx teacher":
        args = ["--teacher", tmp_path / "model.onnx"]
    elif case == "a folder that is not a run":
        args = ["--teacher", tmp_path]
    elif case.startswith("a cross-validation folder"):
        (tmp_path / "cv5").mkdir()
        (tmp_path / "cv5" / "cv_recipe.toml").write_text("")  # what marks a CV folder
        (tmp_path / "spec.toml").write_text('[[member]]\npath = "cv5"\n')
        args = ["--teacher", tmp_path / ("spec.toml" if case.endswith("spec") else "cv5")]
    elif case == "a missing teacher":
        args = ["--teacher", tmp_path / "nowhere.safetensors"]
    elif case == "another val split":
        args = ["--teacher", save_random_checkpoint(tmp_path / "split7.safetensors", demo_root, split_seed=7)]
    elif case == "another exif_transpose":
        args += ["--set", "data.exif_transpose=true"]
    elif case == "cross-validation folds":
        args += ["--set", "data.folds=3"]
    elif case == "weight above 1":
        args += ["--weight", "1.5"]
    elif case == "weight below 0 in the recipe":
        recipe = write_recipe(demo_root, extra=f'\n[distill]\nteachers = ["{teachers[0]}"]\nweight = -0.1\n')
    elif case == "no teacher":
        args = []
    elif case == "an unlabeled image that does not decode":
        args += ["--unlabeled", broken_image_list(demo_root, tmp_path)]
    elif case == "an unlabeled image of train.csv":
        args += ["--unlabeled", train_image_list(demo_root, tmp_path)]
    result = run_cli("distill", recipe, *args, "--out", tmp_path / "runs")
    assert_one_line_error(result, *needles)
    assert not any((tmp_path / "runs").glob("*/*")), "a run folder was made"


def test_train_with_folds_refuses_a_distill_table_before_making_a_cv_folder(run_cli, demo_root, write_recipe, teachers,
                                                                            tmp_path):
    recipe = write_recipe(demo_root, extra=f'\n[distill]\nteachers = ["{teachers[0]}"]\n')
    result = run_cli("train", recipe, "--folds", "3", "--out", tmp_path / "runs")
    assert_one_line_error(result, "[distill] with [data] folds", "unset [data] folds")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.*")), "a CV folder was made"
