"""The DACON layout checks: the CSVs, the image paths and the images they name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.images import check_images
from aicoss_cli.data.tables import read_test, read_train


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_classes_and_labels_come_from_the_header(demo_root):
    table = read_train(demo_root)
    assert table.classes == [f"digit_{d}" for d in range(10)]
    assert table.labels.shape == (240, 10) and set(np.unique(table.labels)) <= {0, 1}
    assert all(Path(p).is_file() for p in table.paths)
    test = read_test(demo_root, table.classes)
    sample = (demo_root / "sample_submission.csv").read_text().splitlines()
    assert test.ids == [line.split(",")[0] for line in sample[1:]]


def test_any_class_count_and_names_work(data_copy):
    csv = data_copy / "train.csv"
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    header[2:] = [f"land use {i}" for i in range(len(header) - 2)]
    csv.write_text("\n".join([",".join(header[:5])] + [",".join(line.split(",")[:5]) for line in lines[1:]]) + "\n")
    table = read_train(data_copy)
    assert table.classes == ["land use 0", "land use 1", "land use 2"]


def edit_csv(path: Path, row: int, column: int, value: str) -> None:
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[column] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_label_outside_the_allowed_values_names_row_and_column(data_copy):
    edit_csv(data_copy / "train.csv", 5, 4, "2")
    message = error_of(read_train, data_copy)
    assert "train.csv" in message and "row 6" in message and "'digit_2'" in message and "-1, 0, 1" in message


def test_empty_label_cell_is_an_error(data_copy):
    edit_csv(data_copy / "train.csv", 3, 2, "")
    assert "row 4" in error_of(read_train, data_copy)


def test_duplicate_ids_are_named(data_copy):
    edit_csv(data_copy / "train.csv", 7, 0, "TRAIN_00000")
    message = error_of(read_train, data_copy)
    assert "duplicate img_id 'TRAIN_00000'" in message and "rows 2, 8" in message


def test_missing_id_columns(data_copy):
    csv = data_copy / "train.csv"
    csv.write_text(csv.read_text().replace("img_path", "path", 1))
    message = error_of(read_train, data_copy)
    assert "train.csv" in message and "'img_path'" in message


def test_missing_root_and_csv(tmp_path, data_copy):
    assert "data folder not found" in error_of(read_train, tmp_path / "nowhere")
    (data_copy / "train.csv").unlink()
    assert "train.csv" in error_of(read_train, data_copy)


def test_paths_cannot_escape_the_data_root(data_copy):
    edit_csv(data_copy / "train.csv", 1, 1, "../../etc/passwd")
    message = error_of(read_train, data_copy)
    assert "outside the data root" in message and "row 2" in message


def test_missing_images_are_counted_and_the_first_named(data_copy):
    for name in ("TRAIN_00003.jpg", "TRAIN_00010.jpg", "TRAIN_00011.jpg"):
        (data_copy / "train" / name).unlink()
    table = read_train(data_copy)
    message = error_of(check_images, table.paths, data_copy / "train.csv")
    assert "3 of 240 images are missing" in message and "train/TRAIN_00003.jpg" in message


def test_truncated_and_garbage_images_are_caught_before_training(data_copy):
    jpg = data_copy / "train" / "TRAIN_00004.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    table = read_train(data_copy)
    message = error_of(check_images, table.paths, data_copy / "train.csv")
    assert "TRAIN_00004.jpg" in message and "truncated" in message
    jpg.write_bytes(b"not an image at all")
    assert "unreadable" in error_of(check_images, table.paths, data_copy / "train.csv")


def test_test_csv_must_match_the_sample_submission(data_copy):
    table = read_train(data_copy)
    edit_csv(data_copy / "test.csv", 2, 0, "SOMETHING_ELSE")
    message = error_of(read_test, data_copy, table.classes)
    assert "does not match sample_submission.csv" in message and "SOMETHING_ELSE" in message


def data_error(root: Path, what: str = "train") -> str:
    from aicoss_cli.base.errors import UserError
    from aicoss_cli.data.images import check_images
    from aicoss_cli.data.tables import read_test, read_train

    with pytest.raises(UserError) as info:
        if what == "train":
            table = read_train(root)
            check_images(table.paths, root / "train.csv")
        else:
            read_test(root)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["train.csv", "sample_submission.csv"])
def test_a_duplicated_class_column_is_refused_by_name(data_copy, name):
    path = data_copy / name
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace("digit_4", "digit_3")  # pandas would read it as digit_3.1
    path.write_text("\n".join(lines) + "\n")
    message = data_error(data_copy, "train" if name == "train.csv" else "test")
    assert name in message and "'digit_3'" in message and "twice" in message, message


def test_a_class_named_like_a_pandas_rename_is_fine(data_copy):
    from aicoss_cli.data.tables import read_train

    path = data_copy / "train.csv"
    path.write_text(path.read_text().replace("digit_4", "digit_3.1", 1))
    assert read_train(data_copy).classes[4] == "digit_3.1"


@pytest.mark.parametrize("target", ["file", "folder"])
def test_a_symlink_out_of_the_data_root_is_refused(data_copy, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    image = data_copy / "train" / "TRAIN_00004.jpg"
    if target == "file":
        (outside / "elsewhere.jpg").write_bytes(image.read_bytes())
        image.unlink()
        image.symlink_to(outside / "elsewhere.jpg")
    else:
        (data_copy / "train").rename(outside / "train")
        (data_copy / "train").symlink_to(outside / "train")
    message = data_error(data_copy)
    first = ("row 6: img_path './train/TRAIN_00004.jpg'" if target == "file"
             else "row 2: img_path './train/TRAIN_00000.jpg'")
    assert "train.csv" in message and first in message, message
    assert "outside the data root" in message and "link" in message, message


def test_symlinks_inside_the_data_root_and_a_linked_root_are_fine(data_copy, tmp_path):
    from aicoss_cli.data.tables import read_train

    image = data_copy / "train" / "TRAIN_00004.jpg"
    (data_copy / "store").mkdir()
    image.rename(data_copy / "store" / "x.jpg")
    image.symlink_to(data_copy / "store" / "x.jpg")
    (tmp_path / "linked").symlink_to(data_copy)
    assert len(read_train(tmp_path / "linked")) == 240
