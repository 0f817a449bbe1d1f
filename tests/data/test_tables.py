"""The DACON layout checks, the splits, the transforms and the samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.images import check_images
from aicoss_cli.data.loading import ImageDataset
from aicoss_cli.data.samplers import TrainBatches, shard
from aicoss_cli.data.splits import class_ratio_gap, split_indices
from aicoss_cli.data.tables import read_test, read_train
from aicoss_cli.data.transforms import Cutout, build_train_transform, sample_seed


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


def test_random_split_reproduces_sklearn_train_test_split(demo_root):
    from sklearn.model_selection import train_test_split

    labels = read_train(demo_root).labels
    train, val = split_indices(labels, "random", 0.1, 78)
    ref_train, ref_val = train_test_split(np.arange(len(labels)), test_size=0.1, random_state=78)
    assert np.array_equal(val, np.sort(ref_val)) and np.array_equal(train, np.sort(ref_train))
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)


def test_stratified_split_balances_class_ratios_better_than_random(demo_root):
    labels = read_train(demo_root).labels
    gaps = {}
    for kind in ("random", "stratified"):
        per_seed = [class_ratio_gap(labels, *split_indices(labels, kind, 0.2, s)).mean() for s in range(5)]
        gaps[kind] = float(np.mean(per_seed))
    assert gaps["stratified"] < gaps["random"] / 2, gaps


def test_cutout_fills_one_square_with_one_colour():
    torch.manual_seed(0)
    img = torch.full((3, 20, 20), 7, dtype=torch.uint8)
    out = Cutout(0.5)(img)
    changed = (out != img).any(dim=0)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert changed.sum() > 0 and (ys.max() - ys.min() + 1) <= 10 and (xs.max() - xs.min() + 1) <= 10
    colours = out[:, changed].T.unique(dim=0)
    assert len(colours) == 1


@pytest.mark.parametrize("policy", ["weak", "strong", "none"])
def test_transforms_keep_shape_and_range_and_are_deterministic_per_seed(demo_root, policy):
    table = read_train(demo_root)
    ds = ImageDataset(table.paths, table.labels, 40, build_train_transform(policy, 9, 2, 0.5))
    a, target, index, error = ds[(3, sample_seed(1, 0, 3))]
    b, *_ = ds[(3, sample_seed(1, 0, 3))]
    c, *_ = ds[(3, sample_seed(1, 1, 3))]
    assert a.shape == (3, 40, 40) and a.dtype == torch.uint8 and error == "" and index == 3
    assert torch.equal(a, b)
    assert torch.equal(target, torch.from_numpy(table.labels[3].astype(np.float32)))
    plain, *_ = ds[3]
    if policy == "none":
        assert torch.equal(a, plain) and torch.equal(a, c)
    else:
        assert not torch.equal(a, c)  # another epoch, another augmentation


def test_augmentation_leaves_the_global_rng_alone(demo_root):
    table = read_train(demo_root)
    ds = ImageDataset(table.paths, table.labels, 32, build_train_transform("weak"))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ds[(0, 123)]
    assert torch.equal(torch.rand(3), expected)


def test_undecodable_image_becomes_an_error_string_not_a_crash(data_copy):
    table = read_train(data_copy)
    Path(table.paths[2]).write_bytes(b"garbage")
    image, _, _, error = ImageDataset(table.paths, table.labels, 32)[2]
    assert image.shape == (3, 32, 32) and "TRAIN_00002.jpg" in error and "cannot decode" in error


def test_train_batches_cover_the_global_batch_whatever_the_world_size():
    rows = np.arange(100, 200)
    single = [b for b in TrainBatches(rows, 16, 2, 0, 1, seed=3, epoch=1, augment=False)]
    ranks = [list(TrainBatches(rows, 16, 2, r, 2, seed=3, epoch=1, augment=False)) for r in range(2)]
    assert len(single) == 6 * 2 and all(len(b) == 8 for b in single)
    for step in range(6):
        one = sorted(single[2 * step] + single[2 * step + 1])
        two = sorted(sum((ranks[r][2 * step + m] for r in range(2) for m in range(2)), []))
        assert one == two
    resumed = list(TrainBatches(rows, 16, 2, 0, 1, seed=3, epoch=1, start_step=4, augment=False))
    assert resumed == single[8:]
    other_epoch = list(TrainBatches(rows, 16, 2, 0, 1, seed=3, epoch=2, augment=False))
    assert other_epoch != single


def test_shards_partition_without_duplicates():
    rows = np.arange(10)
    parts = [shard(rows, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), rows)
