"""`aicoss predict` through the real CLI: the submission layout, the val tables, TTA, precision, outputs and bad
input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aicoss_cli.data.splits import split_indices
from aicoss_cli.data.tables import read_train
from aicoss_cli.evaluation.metrics import average_precision_per_class, mean_average_precision
from aicoss_cli.models.checkpoint import save_checkpoint

from helpers import assert_one_line_error, edit_metadata, leftovers, read_csv, save_random_checkpoint


def test_predict_writes_the_sample_submission_layout(run_cli, demo_root, random_checkpoint, tmp_path):
    out = tmp_path / "pred" / "sub.csv"
    result = run_cli("predict", random_checkpoint, "--out", out)
    assert result.code == 0, result.stderr
    header, ids, probs = read_csv(out)
    sample_header, sample_ids, _ = read_csv(demo_root / "sample_submission.csv")
    assert header == sample_header and ids == sample_ids
    assert probs.shape == (40, 10) and ((probs >= 0) & (probs <= 1)).all()
    assert "submission:" in result.stdout and "fp32" in result.stdout


def test_predict_default_out_is_beside_the_checkpoint_and_data_comes_from_its_recipe(run_cli, random_checkpoint):
    result = run_cli("predict", random_checkpoint)
    assert result.code == 0, result.stderr
    assert (random_checkpoint.parent / "predictions_model_test.csv").is_file()


def test_predict_val_reports_the_map_of_its_own_probabilities(run_cli, demo_root, tmp_path):
    ckpt = save_random_checkpoint(tmp_path / "m.safetensors", demo_root, seed=3)
    out = tmp_path / "val" / "val_scores.csv"
    result = run_cli("predict", ckpt, "--split", "val", "--out", out)
    assert result.code == 0, result.stderr
    header, ids, probs = read_csv(out)
    table = read_train(demo_root)
    _, val = split_indices(table.labels, "random", 0.2, 78)
    assert ids == [table.ids[i] for i in val]
    targets = table.labels[val]
    expected = mean_average_precision(targets, probs)
    assert f"val mAP {expected:.4f}" in result.stdout

    per_class = list(csv.DictReader(open(out.parent / "val_scores_per_class.csv")))
    assert [r["class"] for r in per_class] == header[1:]
    aps = average_precision_per_class(targets, probs)
    assert [float(r["ap"]) for r in per_class] == pytest.approx(list(aps), abs=2e-6)
    weakest = header[1:][int(np.argmin(aps))]
    assert next(r for r in per_class if r["rank"] == "1")["class"] == weakest
    assert "per class on the val split" in result.stdout and weakest in result.stdout
    # F1 / precision / recall at the default threshold 0.5, as scikit-learn computes them
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(targets, (probs >= 0.5).astype(int), average=None, zero_division=0)
    assert [float(row["f1"]) for row in per_class] == pytest.approx(list(f), abs=2e-6)
    assert [float(row["precision"]) for row in per_class] == pytest.approx(list(p), abs=2e-6)
    assert [float(row["recall"]) for row in per_class] == pytest.approx(list(r), abs=2e-6)


def test_two_val_predictions_in_one_folder_keep_their_own_tables_and_nothing_is_replaced(run_cli, demo_root,
                                                                                         tmp_path):
    ckpt = save_random_checkpoint(tmp_path / "m.safetensors", demo_root, seed=3)
    assert run_cli("predict", ckpt, "--split", "val", "--out", tmp_path / "a.csv").code == 0
    assert run_cli("predict", ckpt, "--split", "val", "--out", tmp_path / "b.csv", "--tta", "flips").code == 0
    a, b = (tmp_path / "a_per_class.csv").read_text(), (tmp_path / "b_per_class.csv").read_text()
    assert a != b
    again = run_cli("predict", ckpt, "--split", "val", "--out", tmp_path / "a.csv", "--tta", "flips")
    assert_one_line_error(again, "a.csv: already exists", "--overwrite")
    assert (tmp_path / "a_per_class.csv").read_text() == a
    assert run_cli("predict", ckpt, "--split", "val", "--out", tmp_path / "a.csv", "--tta", "flips",
                   "--overwrite").code == 0
    assert (tmp_path / "a_per_class.csv").read_text() == b


def test_tta_hflip_is_the_mean_of_the_two_views_predicted_independently(run_cli, demo_root, random_checkpoint,
                                                                        tmp_path):
    flipped = tmp_path / "flipped"
    (flipped / "test").mkdir(parents=True)
    lines = (demo_root / "test.csv").read_text().splitlines()
    for line in lines[1:]:
        img_id, rel = line.split(",")
        Image.open(demo_root / rel).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(flipped / "test" / f"{img_id}.png")
    (flipped / "test.csv").write_text("\n".join([lines[0]] + [f"{l.split(',')[0]},./test/{l.split(',')[0]}.png"
                                                              for l in lines[1:]]) + "\n")
    shutil.copy(demo_root / "sample_submission.csv", flipped)

    runs = {"plain": ("--tta", "none"), "mirror": ("--data", flipped), "tta": ("--tta", "hflip")}
    probs = {}
    for name, extra in runs.items():
        result = run_cli("predict", random_checkpoint, "--out", tmp_path / f"{name}.csv", *extra)
        assert result.code == 0, result.stderr
        probs[name] = read_csv(tmp_path / f"{name}.csv")[2]
    np.testing.assert_allclose(probs["tta"], (probs["plain"] + probs["mirror"]) / 2, atol=1e-6)
    assert np.abs(probs["plain"] - probs["mirror"]).max() > 1e-4


def test_predict_fp16_on_the_cpu_runs_bf16_and_says_so(run_cli, random_checkpoint, tmp_path):
    result = run_cli("predict", random_checkpoint, "--precision", "fp16", "--out", tmp_path / "half.csv")
    assert result.code == 0, result.stderr
    assert "bf16" in result.stdout and "fp16 needs CUDA" in result.stdout
    assert run_cli("predict", random_checkpoint, "--out", tmp_path / "full.csv").code == 0
    np.testing.assert_allclose(read_csv(tmp_path / "half.csv")[2], read_csv(tmp_path / "full.csv")[2], atol=0.05)


# --------------------------------------------------------------------------- bad input


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c, d: (["predict", c.parent / "nope.safetensors"], None), "checkpoint not found"),
        (lambda c, d: (["predict", _truncate(c)], None), "truncated or corrupt"),
        (lambda c, d: (["predict", c, "--data", d], (d / "sample_submission.csv").write_text(
            "\n".join((d / "sample_submission.csv").read_text().splitlines()[:-1]) + "\n")),
         "does not match sample_submission.csv"),
        (lambda c, d: (["predict", c, "--data", d], [(d / n).write_text((d / n).read_text().splitlines()[0] + "\n")
                                                      for n in ("test.csv", "sample_submission.csv")]),
         "no rows"),
        (lambda c, d: (["predict", c, "--data", d, "--split", "val"], (d / "train.csv").write_text(
            "\n".join((d / "train.csv").read_text().splitlines()[:-3]) + "\n")),
         "pass the --data it was trained on"),
        (lambda c, d: (["predict", c, "--data", d], (d / "sample_submission.csv").write_text(
            (d / "sample_submission.csv").read_text().replace("digit_9", "digit_nine", 1))),
         "class columns do not match"),
        (lambda c, d: (["predict", c, "--tta", "rotate"], None), "'rotate' is not one of 'none', 'hflip', 'flips'"),
        (lambda c, d: (["predict", c, "--split", "train"], None), "'--split': 'train' is not one of 'test', 'val'"),
    ],
    ids=["missing", "truncated", "submission-mismatch", "empty-test", "other-train-csv", "other-classes", "tta",
         "split"],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(run_cli, random_checkpoint, data_copy, tmp_path, damage,
                                                         needle):
    args, _ = damage(random_checkpoint, data_copy)
    out = tmp_path / "out" / "sub.csv"
    result = run_cli(*args, "--out", out)
    assert_one_line_error(result, needle)
    assert not out.exists() and not leftovers(out.parent)


def test_out_that_cannot_be_written_is_refused_before_any_work(run_cli, random_checkpoint, demo_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("predict", random_checkpoint, "--out", blocker / "sub.csv"), "cannot be written")
    assert_one_line_error(run_cli("predict", random_checkpoint, "--out", tmp_path), "is a folder")
    before = random_checkpoint.read_bytes()
    assert_one_line_error(run_cli("predict", random_checkpoint, "--out", random_checkpoint), "is an input")
    assert random_checkpoint.read_bytes() == before
    sample = demo_root / "sample_submission.csv"
    text = sample.read_text()
    assert_one_line_error(run_cli("predict", random_checkpoint, "--out", sample), "is an input")
    assert sample.read_text() == text


def test_a_write_that_fails_at_the_end_leaves_no_partial_csv(run_cli, random_checkpoint, tmp_path, monkeypatch):
    import pandas as pd

    def failing_to_csv(self, path, *args, **kwargs):
        Path(path).write_text("img_id,partial\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", failing_to_csv)
    out = tmp_path / "o" / "sub.csv"
    out.parent.mkdir()
    assert_one_line_error(run_cli("predict", random_checkpoint, "--out", out), "No space left on device")
    assert not out.exists() and not leftovers(out.parent)


def test_weights_that_do_not_fit_the_arch_are_a_one_line_error(run_cli, random_checkpoint, tmp_path):
    from aicoss_cli.models.checkpoint import load_checkpoint

    state, meta = load_checkpoint(random_checkpoint)
    state.pop(next(iter(state)))
    save_checkpoint(tmp_path / "broken.safetensors", state, meta)
    out = tmp_path / "sub.csv"
    assert_one_line_error(run_cli("predict", tmp_path / "broken.safetensors", "--out", out), "weights do not fit")
    assert not out.exists()


def test_temporaries_left_by_a_killed_writer_are_removed_on_the_next_write(run_cli, random_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    out = tmp_path / "sub.csv"
    stale = tmp_path / f".sub.csv.{gone.pid}-0bad.tmp"
    live = tmp_path / f".sub.csv.{os.getpid()}-0ok0.tmp"  # a writer that still runs (this one)
    other = tmp_path / f".other.csv.{gone.pid}-0bad.tmp"  # another file's: not ours to judge here
    for path in (stale, live, other):
        path.write_bytes(b"")
    assert run_cli("predict", random_checkpoint, "--out", out).code == 0
    assert not stale.exists() and live.exists() and other.exists()


def test_an_edited_image_size_is_refused_before_any_allocation(run_cli, random_checkpoint, demo_root, tmp_path):
    edit_metadata(random_checkpoint, img_size="100000")
    result = run_cli("predict", random_checkpoint, "--data", demo_root, "--out", tmp_path / "p.csv")
    assert_one_line_error(result, str(random_checkpoint), "img_size", "100000")
    assert not (tmp_path / "p.csv").exists()


def test_non_finite_probabilities_are_never_written(run_cli, demo_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from aicoss_cli.base.files import read_safetensors

    from helpers import save_random_checkpoint

    path = save_random_checkpoint(tmp_path / "nan.safetensors", demo_root)
    tensors, meta = load_file(str(path)), read_safetensors(path, tensors=False)[1]
    tensors = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    result = run_cli("predict", path, "--out", tmp_path / "p.csv")
    assert_one_line_error(result, str(path), "nothing written", "not finite", "TEST_")
    assert not (tmp_path / "p.csv").exists()
