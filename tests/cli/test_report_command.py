"""`aicoss report`: run summaries, the three pictures, and bad input, on two real tiny runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from sklearn.metrics import average_precision_score

from aicoss_cli.base.console import clock

from helpers import assert_one_line_error, assert_picture

PICTURES = ("curves.png", "per_class_ap.png", "ensemble_tradeoff.png")


def _metrics(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _best(run: Path) -> dict[str, float]:
    rows = _metrics(run)
    return max(rows, key=lambda r: (r["val_map"], -r["epoch"]))  # the first of equal maxima


def _sklearn_ap(run: Path, demo_root: Path) -> dict[str, float]:
    """Per-class AP computed independently: val_scores.csv and train.csv read with the csv module."""
    with open(demo_root / "train.csv", newline="") as f:
        labels = {row["img_id"]: row for row in csv.DictReader(f)}
    with open(run / "val_scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    classes = [c for c in scores[0] if c != "img_id"]
    out = {}
    for c in classes:
        y = [int(labels[r["img_id"]][c]) for r in scores]
        s = [float(r[c]) for r in scores]
        out[c] = average_precision_score(y, s) if any(y) else math.nan
    return out


def _ensemble_json(path: Path, run_dirs: list[Path], **changes) -> Path:
    data = {
        "format": "aicoss-ensemble-result/1", "submission": "ens.csv",
        "members": [{"path": str(m / "best.safetensors"), "arch": "tiny_convnet", "img_size": 32, "weight": 0.5,
                     "val_map": 0.3 + 0.01 * i} for i, m in enumerate(run_dirs)],
        "val_map": 0.4321, "equal_val_map": 0.4210, "weighting": "auto", "n_val": 48, "n_test": 40,
        "img_per_s": 812.5, "seconds": 3.25, "device": "cpu", "precision": "bf16",
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def _row(stdout: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with `first_cell`."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{stdout}")


def _label(run: Path) -> str:
    return f"tiny {run.name}"


# --------------------------------------------------------------------------- the report


def test_report_draws_three_pictures_and_prints_the_numbers_of_metrics_csv_and_the_result_json(
        run_cli, runs, demo_root, tmp_path):
    ens = _ensemble_json(tmp_path / "ens.json", runs)
    out = tmp_path / "report"
    result = run_cli("report", *runs, "--ensemble", ens, "--out", out)
    assert result.code == 0, result.stderr
    for name in PICTURES:
        assert_picture(out / name)

    for run in runs:
        rows, best = _metrics(run), _best(run)
        cells = _row(result.stdout, _label(run))
        assert cells[1:5] == ["tiny", "tiny_convnet", "bce", "2/2"]
        assert cells[5] == f"{best['val_map']:.4f}" and cells[6] == str(int(best["epoch"]))
        assert cells[7] == clock(sum(r["seconds"] for r in rows))

    expected = [_sklearn_ap(run, demo_root) for run in runs]
    mean = {c: (expected[0][c] + expected[1][c]) / 2 for c in expected[0]}
    weakest = sorted(mean, key=mean.get)[:5]
    for rank, c in enumerate(sorted(mean, key=mean.get), start=1):
        cells = _row(result.stdout, c)
        assert cells[2:6] == [f"{expected[0][c]:.4f}", f"{expected[1][c]:.4f}", f"{mean[c]:.4f}", str(rank)], c
    assert "weakest 5 in red" in result.stdout and len(weakest) == 5

    cells = _row(result.stdout, str(ens))
    assert cells[1:5] == ["2", "auto", "0.4321", "0.4210"]
    assert cells[5] == clock(sum(sum(r["seconds"] for r in _metrics(run)) for run in runs))
    assert cells[6:] == ["812.5", "3.2", "cpu", "bf16"]


def test_report_json_holds_the_same_numbers_and_nothing_else_is_on_stdout(run_cli, runs, demo_root, tmp_path):
    ens = _ensemble_json(tmp_path / "ens.json", runs, val_map=None)
    result = run_cli("report", *runs, "--ensemble", ens, "--out", tmp_path / "r", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["format"] == "aicoss-report/1"
    for run, got in zip(runs, data["runs"], strict=True):
        rows, best = _metrics(run), _best(run)
        assert got["metrics"] == [{**r, "epoch": int(r["epoch"])} for r in rows]
        assert (got["best_val_map"], got["best_epoch"], got["epochs_done"]) == (best["val_map"], best["epoch"], 2)
        assert got["train_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=1e-9)
        expected = _sklearn_ap(run, demo_root)
        ap = dict(zip(got["per_class_ap"]["classes"], got["per_class_ap"]["ap"]))
        assert ap == pytest.approx(expected, abs=1e-12)
        assert got["per_class_ap"]["weakest"] == sorted(expected, key=expected.get)[:5]
    (e,) = data["ensembles"]
    assert e["val_map"] is None and e["equal_val_map"] == 0.4210 and e["img_per_s"] == 812.5
    assert [m["val_map"] for m in e["members"]] == [0.3, 0.31]
    assert e["train_seconds"] == pytest.approx(sum(r["train_seconds"] for r in data["runs"]))
    assert "no val mAP recorded" in result.stderr  # the note goes to stderr, stdout stays JSON


def test_a_run_still_training_is_reported_from_its_partial_metrics_and_its_run_json(run_cli, runs, tmp_path):
    run = runs[0]
    lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(lines[:2]) + "\n")  # only epoch 1 done
    first = _metrics(run)[0]
    info = {"format": "aicoss-run/1", "name": "tiny", "arch": "tiny_convnet", "loss": "bce", "epochs": 2,
            "epochs_done": 1, "best_epoch": 1, "best_val_map": first["val_map"], "train_seconds": 12.5,
            "train_img_per_s": 345.6, "eval_img_per_s": 901.2, "device": "cpu", "precision": "fp32",
            "status": "training"}
    (run / "run.json").write_text(json.dumps(info))
    result = run_cli("report", run, "--json")
    assert result.code == 0, result.stderr
    (got,) = json.loads(result.stdout)["runs"]
    assert got["status"] == "training" and got["epochs_done"] == 1 and len(got["metrics"]) == 1
    # the numbers of metrics.csv stay its own; run.json adds what metrics.csv cannot say
    assert (got["train_seconds"], got["train_img_per_s"], got["eval_img_per_s"]) == (first["seconds"], 345.6, 901.2)
    for name in PICTURES:  # one run: the pictures go into its own folder
        assert_picture(run / name)
    table = run_cli("report", run)
    assert _row(table.stdout, _label(run))[7:11] == [clock(first["seconds"]), "345.6", "901.2", "training"]


def test_ensemble_members_alone_name_the_runs(run_cli, runs, tmp_path):
    ens = _ensemble_json(tmp_path / "ens.json", runs)
    result = run_cli("report", "--ensemble", ens, "--out", tmp_path / "r", "--json")
    assert result.code == 0, result.stderr
    assert [r["run_dir"] for r in json.loads(result.stdout)["runs"]] == [str(r) for r in runs]


# --------------------------------------------------------------------------- bad input


def test_a_folder_that_is_not_a_run_is_a_one_line_error(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("report", tmp_path / "empty"), "not an aicoss run folder")
    assert_one_line_error(run_cli("report", tmp_path / "missing"), "missing", "not an aicoss run folder")
    assert not any((tmp_path / "empty").iterdir())


def test_a_run_with_no_finished_epoch_is_a_one_line_error(run_cli, runs):
    curves = (runs[0] / "curves.png").read_bytes()  # the Trainer's own, drawn after each epoch
    header = (runs[0] / "metrics.csv").read_text().splitlines()[0]
    (runs[0] / "metrics.csv").write_text(header + "\n")
    assert_one_line_error(run_cli("report", runs[0]), "no finished epoch")
    (runs[0] / "metrics.csv").unlink()
    assert_one_line_error(run_cli("report", runs[0]), "no finished epoch")
    assert (runs[0] / "curves.png").read_bytes() == curves


def test_a_damaged_metrics_csv_names_the_row(run_cli, runs):
    text = (runs[0] / "metrics.csv").read_text().splitlines()
    cells = text[2].split(",")
    cells[4] = "lots"
    (runs[0] / "metrics.csv").write_text("\n".join([text[0], text[1], ",".join(cells)]) + "\n")
    assert_one_line_error(run_cli("report", runs[0]), "metrics.csv: row 3, column 'val_map'", "not a number")


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else/1"}', "not an aicoss ensemble result"),
    ({"val_map": "NaN"}, "'val_map' must be null or a number in [0, 1]"),
    ({"val_map": 1.5}, "'val_map' must be null or a number in [0, 1]"),
    ({"img_per_s": "fast"}, "'img_per_s' must be a finite number > 0"),
    ({"members": []}, "'members' must be a non-empty list"),
    ({"members": [{"path": 3}]}, "'members[0].path' must be a string"),
    ({"weighting": "best"}, "'weighting' must be"),
], ids=["syntax", "format", "nan", "range", "type", "no-members", "member-path", "weighting"])
def test_a_bad_ensemble_result_is_a_one_line_error_naming_the_file(run_cli, runs, tmp_path, content, needle):
    path = tmp_path / "bad.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        _ensemble_json(path, runs, **content)
        if content.get("val_map") == "NaN":
            path.write_text(path.read_text().replace('"NaN"', "NaN"))  # JSON's NaN extension, as Python writes it
    out = tmp_path / "out"
    assert_one_line_error(run_cli("report", *runs, "--ensemble", path, "--out", out), "bad.json", needle)
    assert not out.exists()


def test_a_damaged_val_scores_csv_is_a_one_line_error(run_cli, runs):
    lines = (runs[0] / "val_scores.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[3] = "inf"
    (runs[0] / "val_scores.csv").write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    assert_one_line_error(run_cli("report", runs[0]), "val_scores.csv: row 2",
                          "not a probability")


def test_a_users_file_is_never_replaced(run_cli, runs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "per_class_ap.png").write_bytes(b"my own picture")
    assert_one_line_error(run_cli("report", *runs, "--out", out), "per_class_ap.png", "not written by aicoss report")
    assert (out / "per_class_ap.png").read_bytes() == b"my own picture"
    assert sorted(p.name for p in out.iterdir()) == ["per_class_ap.png"]
    again = tmp_path / "again"
    assert run_cli("report", *runs, "--out", again).code == 0
    assert run_cli("report", *runs, "--out", again).code == 0  # its own pictures are redrawn


def test_missing_data_skips_the_per_class_picture_with_a_note(run_cli, runs, tmp_path):
    recipe = runs[0] / "recipe.toml"
    lines = [('root = "/nonexistent/data"' if line.startswith("root = ") else line)
             for line in recipe.read_text().splitlines()]
    recipe.write_text("\n".join(lines) + "\n")
    result = run_cli("report", runs[0], "--out", tmp_path / "r")
    assert result.code == 0, result.stderr
    assert "no per-class AP" in result.stdout and "--data" in result.stdout
    assert not (tmp_path / "r" / "per_class_ap.png").exists() and (tmp_path / "r" / "curves.png").is_file()


# --------------------------------------------------------------------------- one "best epoch"


def test_with_an_ema_the_reported_best_epoch_is_the_one_best_safetensors_holds(runs, run_cli):
    """metrics.csv where the raw weights peak at epoch 1 and the EMA weights at epoch 2: the
    Trainer's rule (`keep`) keeps epoch 2's EMA weights, and `report` must name that epoch and that
    value, not the raw weights' best."""
    from aicoss_cli.results.layout import best_row
    from aicoss_cli.train.keep import is_better

    run = runs[0]
    rows = [{"epoch": 1, "lr": 0.003, "train_loss": 0.6, "val_loss": 0.5, "val_map": 0.62, "val_map_ema": 0.55,
             "seconds": 1.0},
            {"epoch": 2, "lr": 0.003, "train_loss": 0.5, "val_loss": 0.4, "val_map": 0.60, "val_map_ema": 0.66,
             "seconds": 1.0}]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run / "run.json").unlink(missing_ok=True)
    best_epoch, best_map = 0, -1.0  # what the Trainer does, epoch by epoch
    for row in rows:
        if is_better(row, best_epoch, best_map):
            best_epoch, best_map = row["epoch"], max(row["val_map"], row["val_map_ema"])
    assert (best_epoch, best_map) == (2, 0.66) == (best_row(rows)["epoch"], 0.66)
    result = run_cli("report", run, "--json", "--out", run.parent / "pictures")
    assert result.code == 0, result.stderr
    reported = json.loads(result.stdout)["runs"][0]
    assert (reported["best_epoch"], reported["best_val_map"]) == (2, 0.66)


def test_a_trained_ema_run_reports_the_epoch_and_value_of_its_best_checkpoint(run_cli, demo_root, write_recipe,
                                                                             tmp_path):
    from aicoss_cli.models.checkpoint import read_meta

    recipe = write_recipe(demo_root, epochs=3, policy="none")
    recipe.write_text(recipe.read_text().replace("weight_decay = 0.0", "weight_decay = 0.0\nema_decay = 0.8"))
    assert run_cli("train", recipe, "--out", tmp_path / "runs").code == 0
    run = next((tmp_path / "runs" / "tiny").iterdir())
    meta = read_meta(run / "best.safetensors")
    result = run_cli("report", run, "--json")
    assert result.code == 0, result.stderr
    reported = json.loads(result.stdout)["runs"][0]
    assert reported["best_epoch"] == meta.epoch
    assert reported["best_val_map"] == pytest.approx(meta.val_map, abs=1e-6)
