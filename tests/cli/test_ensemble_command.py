"""`aicoss ensemble` and `aicoss benchmark-fp16` through the real CLI, on checkpoints trained in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aicoss_cli.data.splits import split_indices
from aicoss_cli.data.tables import read_train
from aicoss_cli.evaluation.metrics import mean_average_precision

from helpers import assert_one_line_error, leftovers, read_csv, save_random_checkpoint


def _predict(run_cli, ckpt: Path, out: Path, *extra) -> np.ndarray:
    result = run_cli("predict", ckpt, "--out", out, *extra)
    assert result.code == 0, result.stderr
    return read_csv(out)[2]


def test_ensemble_of_one_member_equals_predict(run_cli, ensemble_runs, tmp_path):
    expected = _predict(run_cli, ensemble_runs["a32"], tmp_path / "p.csv")
    result = run_cli("ensemble", ensemble_runs["a32"], "--out", tmp_path / "e.csv")
    assert result.code == 0, result.stderr
    np.testing.assert_array_equal(read_csv(tmp_path / "e.csv")[2], expected)


def test_equal_weight_ensemble_of_mixed_sizes_is_the_mean_of_the_members(run_cli, ensemble_runs, demo_root, tmp_path):
    out = tmp_path / "sub.csv"
    result = run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--out", out)
    assert result.code == 0, result.stderr
    header, ids, probs = read_csv(out)
    sample_header, sample_ids, _ = read_csv(demo_root / "sample_submission.csv")
    assert header == sample_header and ids == sample_ids
    assert ((probs >= 0) & (probs <= 1)).all()
    a = _predict(run_cli, ensemble_runs["a32"], tmp_path / "a.csv")
    b = _predict(run_cli, ensemble_runs["b48"], tmp_path / "b.csv")
    np.testing.assert_allclose(probs, (a + b) / 2, rtol=0, atol=1e-6)
    assert np.abs(a - b).max() > 1e-3  # two different members, so the test can fail

    # each member's val mAP and the ensemble's, on their shared val split
    va = _predict(run_cli, ensemble_runs["a32"], tmp_path / "va.csv", "--split", "val")
    vb = _predict(run_cli, ensemble_runs["b48"], tmp_path / "vb.csv", "--split", "val")
    table = read_train(demo_root)
    targets = table.labels[split_indices(table.labels, "random", 0.2, 78)[1]]
    for value in (mean_average_precision(targets, va), mean_average_precision(targets, vb)):
        assert f"{value:.4f}" in result.stdout
    assert f"ensemble val mAP (equal weights): {mean_average_precision(targets, (va + vb) / 2):.4f}" in result.stdout


def test_fp16_ensemble_runs_in_bf16_on_the_cpu_and_says_so(run_cli, ensemble_runs, tmp_path):
    result = run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--fp16", "--out", tmp_path / "half.csv")
    assert result.code == 0, result.stderr
    assert "bf16" in result.stdout and "fp16 needs CUDA" in result.stdout
    assert run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--out", tmp_path / "full.csv").code == 0
    half, full = read_csv(tmp_path / "half.csv")[2], read_csv(tmp_path / "full.csv")[2]
    np.testing.assert_allclose(half, full, atol=0.05)
    assert not np.array_equal(half, full)  # it really ran in lower precision


def test_auto_weights_report_the_gain_on_a_held_out_half(run_cli, ensemble_runs, demo_root, tmp_path):
    noise = save_random_checkpoint(tmp_path / "noise.safetensors", demo_root, img_size=24, seed=11)
    result = run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], noise, "--weights", "auto",
                     "--out", tmp_path / "s.csv")
    assert result.code == 0, result.stderr
    assert "held out: fit on 24 val images, scored on the other 24" in result.stdout
    assert "gain" in result.stdout and "ensemble val mAP (auto weights)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "tiny_convnet" in line]  # first line of each row
    weights = [float(line.split("│")[6]) for line in rows]
    assert len(weights) == 3 and all(w >= 0 for w in weights) and sum(weights) == pytest.approx(1, abs=2e-3)


def test_spec_gives_member_weights_and_tta(run_cli, ensemble_runs, tmp_path):
    spec = ensemble_runs["runs"].parent / "ensemble.toml"  # member paths are relative to the spec's folder
    spec.write_text(f'[[member]]\npath = "{ensemble_runs["a32"].relative_to(spec.parent)}"\nweight = 3\n'
                    f'tta = "hflip"\n\n'
                    f'[[member]]\npath = "{ensemble_runs["b48"]}"\n')
    result = run_cli("ensemble", "--spec", spec, "--out", tmp_path / "s.csv")
    assert result.code == 0, result.stderr
    a_tta = _predict(run_cli, ensemble_runs["a32"], tmp_path / "a.csv", "--tta", "hflip")
    b = _predict(run_cli, ensemble_runs["b48"], tmp_path / "b.csv")
    np.testing.assert_allclose(read_csv(tmp_path / "s.csv")[2], (3 * a_tta + b) / 4, rtol=0, atol=1e-6)
    assert "(spec weights)" in result.stdout


def test_no_member_named_takes_every_run_under_runs(run_cli, ensemble_runs, demo_root, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "runs"
    shutil.copytree(ensemble_runs["runs"], folder)
    crashed = folder / "crashed" / "20240101T000000Z"  # a run that never finished an epoch
    crashed.mkdir(parents=True)
    (crashed / "recipe.toml").write_text((ensemble_runs["a32"].parent / "recipe.toml").read_text())
    other = folder / "other_split" / "20240101T000000Z"
    save_random_checkpoint(other / "best.safetensors", demo_root, split_seed=5)
    monkeypatch.chdir(tmp_path)
    result = run_cli("ensemble", "--fp16")
    assert result.code == 0, result.stderr
    assert "took 2 run(s)" in result.stdout
    assert "crashed" in result.stdout and "no best.safetensors" in result.stdout
    assert "other_split" in result.stdout and "another split" in result.stdout
    assert (tmp_path / "ensemble_submission.csv").is_file()
    expected = run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--fp16", "--out",
                       tmp_path / "named.csv")
    assert expected.code == 0
    np.testing.assert_array_equal(read_csv(tmp_path / "ensemble_submission.csv")[2],
                                  read_csv(tmp_path / "named.csv")[2])


def test_benchmark_fp16_prints_the_seeds_table(run_cli, ensemble_runs):
    result = run_cli("benchmark-fp16", ensemble_runs["a32"], ensemble_runs["b48"], "--limit", "20", "--batch-size", "8")
    assert result.code == 0, result.stderr
    for row in ("Inference time [sec]", "Inference speed [img/sec]", "val mAP", "FP32", "BF16", "diff."):
        assert row in result.stdout
    assert "largest |probability difference|" in result.stdout and "cpu" in result.stdout

    result = run_cli("benchmark-fp16", ensemble_runs["a32"], ensemble_runs["b48"], "--limit", "20", "--json")
    assert result.code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["images"] == 20 and r["half_dtype"] == "bf16" and r["device"].startswith("cpu")
    assert 0 < r["max_abs_prob_diff"] < 0.05
    a, b = r["fp32"], r["half"]
    assert r["diff_pct"]["seconds"] == pytest.approx((b["seconds"] - a["seconds"]) / a["seconds"] * 100)
    assert r["diff_pct"]["val_map"] == pytest.approx((b["val_map"] - a["val_map"]) / a["val_map"] * 100)


def test_benchmark_val_map_is_the_ensembles(run_cli, ensemble_runs, demo_root, tmp_path):
    r = json.loads(run_cli("benchmark-fp16", ensemble_runs["a32"], ensemble_runs["b48"], "--json").stdout)
    va = _predict(run_cli, ensemble_runs["a32"], tmp_path / "va.csv", "--split", "val")
    vb = _predict(run_cli, ensemble_runs["b48"], tmp_path / "vb.csv", "--split", "val")
    table = read_train(demo_root)
    targets = table.labels[split_indices(table.labels, "random", 0.2, 78)[1]]
    assert r["fp32"]["val_map"] == pytest.approx(mean_average_precision(targets, (va + vb) / 2), abs=1e-5)


# --------------------------------------------------------------------------- bad input


def _other_classes(ckpt: Path, tmp: Path) -> Path:
    from aicoss_cli.models.checkpoint import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(ckpt)
    meta.classes = [c.replace("digit_3", "digit_three") for c in meta.classes]
    save_checkpoint(tmp / "renamed.safetensors", state, meta)
    return tmp / "renamed.safetensors"


def _truncated(ckpt: Path, tmp: Path) -> Path:
    data = ckpt.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 3])
    return tmp / "cut.safetensors"


@pytest.mark.parametrize(
    "second, needle",
    [
        (_other_classes, "class list differs"),
        (lambda c, tmp: save_random_checkpoint(tmp / "s5.safetensors", read_train_root(c), split_seed=5),
         "validated on another split"),
        (lambda c, tmp: tmp / "missing.safetensors", "checkpoint not found"),
        (_truncated, "truncated or corrupt"),
    ],
    ids=["classes", "split", "missing", "truncated"],
)
def test_incompatible_members_are_a_one_line_error_and_write_nothing(run_cli, ensemble_runs, tmp_path, second, needle):
    out = tmp_path / "o" / "sub.csv"
    for command in ("ensemble", "benchmark-fp16"):
        extra = ["--out", out] if command == "ensemble" else []
        second_member = second(ensemble_runs["a32"], tmp_path)
        assert_one_line_error(run_cli(command, ensemble_runs["a32"], second_member, *extra), needle)
    assert not out.exists() and not leftovers(out.parent)


def read_train_root(ckpt: Path) -> Path:
    from aicoss_cli.models.checkpoint import read_meta

    return read_meta(ckpt).data_root


def test_bad_spec_and_bad_data_are_one_line_errors(run_cli, ensemble_runs, demo_root, tmp_path):
    import shutil

    spec = tmp_path / "e.toml"
    spec.write_text(f'[[member]]\npath = "{ensemble_runs["a32"]}"\nwieght = 2\n')
    assert_one_line_error(run_cli("ensemble", "--spec", spec), "member 1: wieght: unknown key")
    assert_one_line_error(run_cli("ensemble", "--weights", "best", ensemble_runs["a32"]),
                          "'--weights': 'best' is not one of 'equal', 'auto'")
    assert_one_line_error(run_cli("ensemble", "--runs", tmp_path / "nowhere"), "no runs folder")

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    lines = (data / "sample_submission.csv").read_text().splitlines()
    (data / "sample_submission.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    out = tmp_path / "sub.csv"
    assert_one_line_error(run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--data", data, "--out", out),
                          "does not match sample_submission.csv")
    for name in ("test.csv", "sample_submission.csv"):
        (data / name).write_text((data / name).read_text().splitlines()[0] + "\n")
    assert_one_line_error(run_cli("ensemble", ensemble_runs["a32"], "--data", data, "--out", out), "no rows")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_cli("ensemble", ensemble_runs["a32"], "--out", blocker / "x.csv"), "cannot be written")
    assert not out.exists() and not leftovers(tmp_path)


def test_ensemble_writes_a_result_file_that_report_reads(run_cli, ensemble_runs, demo_root, tmp_path):
    import json

    from aicoss_cli.evaluation.metrics import mean_average_precision

    out = tmp_path / "sub.csv"
    result = run_cli("ensemble", ensemble_runs["a32"], ensemble_runs["b48"], "--out", out)
    assert result.code == 0, result.stderr
    saved = json.loads((tmp_path / "sub.json").read_text())
    assert saved["format"] == "aicoss-ensemble-result/1" and saved["submission"] == str(out)
    assert [m["path"] for m in saved["members"]] == [str(ensemble_runs["a32"]), str(ensemble_runs["b48"])]
    assert [m["weight"] for m in saved["members"]] == [0.5, 0.5] and saved["weighting"] == "equal"
    assert saved["n_test"] == 40 and saved["img_per_s"] > 0 and saved["precision"] == "fp32"
    # the ensemble's val mAP, recomputed from the members' own val predictions
    preds = [read_csv(_predict_val(run_cli, ensemble_runs[k], tmp_path / f"{k}.csv"))[2] for k in ("a32", "b48")]
    ids = read_csv(tmp_path / "a32.csv")[1]
    from aicoss_cli.data.tables import read_train

    table = read_train(demo_root)
    targets = np.stack([table.labels[table.ids.index(i)] for i in ids])
    assert saved["val_map"] == pytest.approx(mean_average_precision(targets, (preds[0] + preds[1]) / 2), abs=1e-6)
    report = run_cli("report", "--ensemble", tmp_path / "sub.json", "--out", tmp_path / "report", "--json")
    assert report.code == 0, report.stderr
    (got,) = json.loads(report.stdout)["ensembles"]
    assert got["val_map"] == saved["val_map"] and got["img_per_s"] == saved["img_per_s"]


def _predict_val(run_cli, ckpt: Path, out: Path) -> Path:
    result = run_cli("predict", ckpt, "--split", "val", "--out", out)
    assert result.code == 0, result.stderr
    return out


@pytest.fixture
def two_members(demo_root, tmp_path) -> list[Path]:
    from helpers import save_random_checkpoint

    return [save_random_checkpoint(tmp_path / f"m{i}.safetensors", demo_root, seed=i) for i in range(2)]


@pytest.mark.parametrize("weights, expected", [("inf", "finite"), ("nan", "finite"), ("1e308", "add up")])
def test_spec_weights_must_be_finite_with_a_finite_sum(run_cli, two_members, tmp_path, weights, expected):
    spec = tmp_path / "spec.toml"
    spec.write_text("".join(f'[[member]]\npath = "{m.name}"\nweight = {weights}\n' for m in two_members))
    result = run_cli("ensemble", "--spec", spec, "--out", tmp_path / "e.csv")
    assert_one_line_error(result, "spec.toml", expected)
    assert not (tmp_path / "e.csv").exists()


def test_the_ensemble_says_when_equal_weights_lose_to_a_member(run_cli, two_members, tmp_path):
    import json

    result = run_cli("ensemble", *two_members, "--out", tmp_path / "e.csv", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    below = report["val_map"] < max(m["val_map"] for m in report["members"])
    assert below == any("below its best member" in n for n in report["notes"]), report


def test_auto_weights_on_a_val_split_too_small_to_fit_fall_back_to_equal(run_cli, demo_root, tmp_path):
    import shutil

    from helpers import save_random_checkpoint

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines[:11]) + "\n")  # 10 rows: a val split of 1 image
    members = [save_random_checkpoint(tmp_path / f"m{i}.safetensors", data, seed=i, val_fraction=0.1) for i in range(2)]
    result = run_cli("ensemble", *members, "--weights", "auto", "--out", tmp_path / "e.csv", "--data", data)
    assert result.code == 0, result.stderr
    assert "--weights auto falls back to equal weights" in result.stdout and "1 images" in result.stdout
    assert (tmp_path / "e.csv").is_file()
