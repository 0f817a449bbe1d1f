"""`aicoss demo-data`, `split` and `validate --json` through the real CLI."""

from __future__ import annotations

import json

import pytest


def test_validate_and_split_json_is_json_only(run_cli, demo_root, write_recipe):
    from aicoss_cli.data.splits import split_search
    from aicoss_cli.data.tables import read_train

    result = run_cli("validate", write_recipe(demo_root), "--data", demo_root, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["valid"] and data["resolved"]["model"]["arch"] == "tiny_convnet"
    assert (data["data"]["train"], data["data"]["val"], data["data"]["test"]) == (192, 48, 40)
    split = run_cli("split", demo_root, "--search", "20", "--top", "3", "--json")
    assert split.code == 0, split.stderr
    rows = json.loads(split.stdout)["rows"]
    expected = split_search(read_train(demo_root).labels, 0.1, range(20))[:3]
    assert [r["split_seed"] for r in rows] == [e["split_seed"] for e in expected]
    assert rows[0]["mean"] == pytest.approx(expected[0]["mean"])


def test_demo_data_command_is_deterministic_and_never_overwrites(run_cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("demo-data", a, "--n-train", "30", "--n-test", "5", "--size", "32").code == 0
    assert run_cli("demo-data", b, "--n-train", "30", "--n-test", "5", "--size", "32").code == 0
    for name in ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv", "train/TRAIN_00017.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = run_cli("demo-data", other)
    assert result.code == 2 and "not this demo set" in result.stderr
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


def test_split_search_lists_the_most_balanced_seeds_first(run_cli, demo_root):
    result = run_cli("split", demo_root, "--search", "20", "--top", "5")
    assert result.code == 0, result.stderr
    from aicoss_cli.data.splits import split_search
    from aicoss_cli.data.tables import read_train

    best = split_search(read_train(demo_root).labels, 0.1, range(20))[0]
    assert f"--set data.split_seed={best['split_seed']}" in result.stdout
