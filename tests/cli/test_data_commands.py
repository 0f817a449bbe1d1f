"""`aicoss demo-data`, `split` and `validate --json` through the real CLI."""

from __future__ import annotations

import json

import pytest

from helpers import file_mode


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


def test_the_demo_folder_follows_the_umask(umask, tmp_path, run_cli):
    umask(0o022)
    result = run_cli("demo-data", tmp_path / "demo", "--n-train", "10", "--n-test", "2", "--size", "16")
    assert result.code == 0, result.stderr
    root = tmp_path / "demo"
    assert file_mode(root) == 0o755 and file_mode(root / "train") == 0o755
    assert file_mode(root / "train.csv") == 0o644 and file_mode(next((root / "train").iterdir())) == 0o644


@pytest.mark.parametrize("kind", ["random", "stratified"])
def test_split_suggests_every_key_of_the_split_it_searched(run_cli, demo_root, kind):
    from aicoss_cli.data.splits import split_search
    from aicoss_cli.data.tables import read_train

    result = run_cli("split", demo_root, "--kind", kind, "--search", "4", "--val-fraction", "0.2")
    assert result.code == 0, result.stderr
    best = split_search(read_train(demo_root).labels, 0.2, range(4), kind)[0]["split_seed"]
    assert (f"--set data.split={kind} --set data.val_fraction=0.2 --set data.split_seed={best}"
            in result.stdout), result.stdout


def test_demo_data_says_it_reused_an_existing_set(run_cli, tmp_path):
    args = ("demo-data", tmp_path / "demo", "--n-train", "10", "--n-test", "2", "--size", "16")
    first = run_cli(*args)
    assert first.code == 0 and first.stdout.startswith(f"demo data written to {tmp_path / 'demo'}:"), first.stdout
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")}
    again = run_cli(*args)
    assert again.code == 0 and again.stdout.startswith(f"demo data in {tmp_path / 'demo'} reused"), again.stdout
    assert "nothing written" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*")} == before
