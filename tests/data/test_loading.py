"""What feeds the model: `ImageDataset`, `ImageBatches` (inline, from a thread, from loader processes) and
the train samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aicoss_cli.base.errors import UserError
from aicoss_cli.data.loading import ImageDataset
from aicoss_cli.data.samplers import TrainBatches, shard
from aicoss_cli.data.tables import read_test, read_train

from helpers import pil_pixels


def test_batches_are_the_same_inline_from_a_thread_and_from_loader_processes(demo_root):
    from aicoss_cli.data.loading import ImageBatches

    paths = read_test(demo_root).paths[:23]
    inline = list(ImageBatches(paths, [32, 40], batch_size=8))
    assert [b[0].shape for b in inline] == [(8, 3, 32, 32), (8, 3, 32, 32), (7, 3, 32, 32)]
    assert torch.equal(inline[2][1][6], pil_pixels(paths[22], 40))
    for other in (ImageBatches(paths, [32, 40], batch_size=8, background=True),
                  ImageBatches(paths, [32, 40], batch_size=8, workers=2)):
        for a, b in zip(inline, other, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("loader", [{}, {"background": True}, {"workers": 1}], ids=["inline", "thread", "process"])
def test_an_unreadable_image_is_a_one_line_error_naming_it(demo_root, tmp_path, loader):
    from aicoss_cli.data.loading import ImageBatches

    paths = read_test(demo_root).paths[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:300])  # truncated JPEG
    with pytest.raises(UserError) as info:
        list(ImageBatches([*paths, str(broken)], [32], batch_size=4, **loader))
    assert "broken.jpg" in str(info.value) and "\n" not in str(info.value)


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
