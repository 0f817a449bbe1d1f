"""Every CSV aicoss writes ends its lines with LF, as the submission always did (csv.writer's
default is CRLF)."""

from __future__ import annotations

from helpers import save_random_checkpoint


def test_every_csv_ends_its_lines_with_lf(run_cli, demo_root, tmp_path):
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", demo_root)
    commands = (["predict", checkpoint, "--split", "val", "--labels", "0.5", "--out", tmp_path / "v.csv"],
                ["ensemble", checkpoint, "--labels", "auto", "--out", tmp_path / "e.csv"],
                ["prior", checkpoint, "--out", tmp_path / "prior.csv"])
    for args in commands:
        result = run_cli(*args)
        assert result.code == 0, (args, result.stderr)
    written = sorted(tmp_path.glob("*.csv"))
    assert {p.name for p in written} >= {"v.csv", "v_per_class.csv", "v_labels.csv", "v_thresholds.csv", "e.csv",
                                         "e_per_class.csv", "e_labels.csv", "e_thresholds.csv", "prior.csv"}
    for path in written:
        data = path.read_bytes()
        assert b"\r" not in data and data.endswith(b"\n"), path.name
