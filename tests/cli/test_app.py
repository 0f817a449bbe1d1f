"""The app as a whole: the command list, help text, and what `--help` imports."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT


def test_help_does_not_import_torch():
    code = "import sys; from aicoss_cli.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "aicoss_cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "demo-data" in out.stdout


def test_command_list_shows_each_summary_as_flowing_text():
    env = dict(os.environ, COLUMNS="250")
    out = subprocess.run([sys.executable, "-m", "aicoss_cli", "--help"], capture_output=True, text=True,
                         check=True, env=env).stdout
    # docstrings break lines at 100 columns; a 250-column terminal must not show those breaks
    assert "the gap between the train and val positive rate of every class" in out
    assert "row order of sample_submission.csv, or (--split val)" in out


def test_the_cli_imports_no_export_library_for_help():
    code = ("import sys; from aicoss_cli.cli import app; "
            "assert not {'torch', 'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_imports_neither_matplotlib_nor_torch():
    code = ("import sys; sys.argv = ['aicoss', 'report', '--help']\n"
            "from aicoss_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--ensemble" in out.stdout


def test_score_help_does_not_import_torch():
    code = ("import sys; from aicoss_cli.cli import main; sys.argv = ['aicoss', 'score', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--thresholds" in result.stdout
