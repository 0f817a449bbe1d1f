"""The app as a whole: the command list, help text, version, usage errors, output when piped, and what
`--help` imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, assert_one_line_error, help_in_fresh_python


def test_help_imports_neither_torch_nor_an_export_library():
    _, modules = help_in_fresh_python("--help")
    assert not {"torch", "onnx", "onnxruntime", "onnxscript"} & modules, sorted(modules)
    out = subprocess.run([sys.executable, "-m", "aicoss_cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "demo-data" in out.stdout


def test_command_help_shows_each_paragraph_as_flowing_text():
    env = dict(os.environ, COLUMNS="250")

    def help_of(command: str) -> str:
        return subprocess.run([sys.executable, "-m", "aicoss_cli", command, "--help"], capture_output=True, text=True,
                              check=True, env=env).stdout

    # docstrings break lines at 100 columns; a 250-column terminal must not show those breaks (the
    # command list shows one short line per command; the details are in the command's own --help)
    assert "the gap between the train and val positive rate of every class" in help_of("split")
    assert "row order of sample_submission.csv, or (--split val)" in help_of("predict")


def test_report_help_imports_neither_matplotlib_nor_torch():
    stdout, modules = help_in_fresh_python("report", "--help")
    assert not {"matplotlib", "torch"} & modules, "heavy import"
    assert "--ensemble" in stdout


def test_score_help_does_not_import_torch():
    stdout, modules = help_in_fresh_python("score", "--help")
    assert "torch" not in modules
    assert "--thresholds" in stdout


def test_help_keeps_bracketed_section_names(run_cli):
    assert "(overrides [data] root)" in " ".join(run_cli("train", "--help").stdout.split())
    assert '[loss] prior = "prior.csv"' in " ".join(run_cli("prior", "--help").stdout.split())


def test_flags_are_shown_without_a_value(run_cli):
    from aicoss_cli.cli.app import COMMANDS

    assert "--json" in run_cli("count-params", "--help").stdout
    for name, _ in COMMANDS:
        assert "<bool>" not in run_cli(name, "--help").stdout, name


@pytest.mark.parametrize("command, option, choices", [
    ("predict", "--split", "test|val"), ("predict", "--precision", "fp32|fp16|bf16"),
    ("predict", "--tta", "none|hflip|flips"), ("ensemble", "--weights", "equal|auto"),
    ("ensemble", "--tta", "none|hflip|flips"), ("split", "--kind", "random|stratified"),
])
def test_choice_options_list_their_choices_and_refuse_others_in_one_line(run_cli, command, option, choices):
    line = next(row for row in run_cli(command, "--help").stdout.splitlines() if row.startswith(f"│ {option} "))
    assert choices in line, line
    extra = ["x.safetensors"] if command == "predict" else ["data"] if command == "split" else []
    result = run_cli(command, *extra, option, "nonsense")
    assert_one_line_error(result, option, "nonsense")


def test_version_short_help_and_shell_completion(run_cli):
    from aicoss_cli import __version__

    version = run_cli("--version")
    assert version.code == 0 and version.stdout.strip() == f"aicoss {__version__}"
    short = run_cli("predict", "-h")
    assert short.code == 0 and "--split" in short.stdout
    assert "--install-completion" in run_cli("--help").stdout


def test_a_usage_error_is_one_line(run_cli):
    result = run_cli("count-params", "--classes", "0")
    assert_one_line_error(result, "--classes", "greater than or equal to 1", "aicoss count-params --help")
    assert_one_line_error(run_cli("count-params", "--jsn"), "--jsn")


def test_help_ranges_are_what_the_command_accepts(run_cli, demo_root):
    split_help = " ".join(run_cli("split", "--help").stdout.split())
    assert "0<=x<=1" not in split_help.replace(".0", "") and "0 < x < 1" in split_help
    assert_one_line_error(run_cli("split", demo_root, "--val-fraction", "1.0"), "--val-fraction", "(0, 1)")
    demo_help = " ".join(run_cli("demo-data", "--help").stdout.split())
    assert "even" in demo_help


def aicoss(*args) -> subprocess.CompletedProcess:
    """`aicoss ARGS` in a fresh process with stdout and stderr piped (not terminals), COLUMNS unset."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "aicoss_cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_piped_output_is_not_wrapped(demo_root, tmp_path):
    long_folder = tmp_path / ("very_long_folder_name_" * 8) / "demo"
    result = aicoss("demo-data", long_folder, "--n-train", "10", "--n-test", "2", "--size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and str(long_folder) in result.stdout and "test_labels.csv" in result.stdout
    split = aicoss("split", demo_root, "--search", "3", "--top", "2")
    assert split.returncode == 0, split.stderr
    assert "class-ratio gap train vs val (random, val 0.1, 3 states)" in split.stdout.splitlines()[0]
    assert split.stderr == ""


def test_an_error_after_a_progress_display_is_exactly_one_line(run_cli, demo_root, tmp_path):
    import shutil

    from helpers import save_random_checkpoint

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    (data / "test" / "TEST_00007.jpg").write_bytes(b"not a jpeg")
    checkpoint = save_random_checkpoint(tmp_path / "m.safetensors", data)
    result = run_cli("predict", checkpoint, "--data", data, "--out", tmp_path / "p.csv")
    assert result.code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "TEST_00007.jpg" in result.stderr


def test_training_log_has_no_blank_lines(run_cli, demo_root, write_recipe, tmp_path):
    result = run_cli("train", write_recipe(demo_root, epochs=1), "--out", tmp_path / "runs")
    assert result.code == 0, result.stderr
    assert result.stderr.startswith("run folder: ") and "\n\n" not in result.stderr, result.stderr
