"""The bench scripts run end to end (tiny settings; two rounds, so outputs are written twice) and
print the ratios they exist for: a bench that rots (a changed API, an output it may no longer
overwrite) fails here, not on a user's GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT

BENCHES = {
    "train_overhead.py": ["--arch", "tiny_convnet", "--size", "32", "--batch-size", "8", "--steps", "2",
                          "--rounds", "1", "--device", "cpu"],
    "inference_overhead.py": ["--images", "16", "--arch", "tiny_convnet", "--size", "32", "--batch-size", "8",
                              "--rounds", "2", "--members", "tiny_convnet@32,tiny_convnet@48"],
    "onnx_vs_torch.py": ["--images", "16", "--arch", "tiny_convnet", "--size", "32", "--batch-size", "8",
                         "--rounds", "2"],
}


def ratios(report: dict) -> dict[str, float]:
    if "ratios" in report:
        return report["ratios"]
    return {"onnxruntime / pytorch": report["ratio_onnxruntime_over_pytorch"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(BENCHES))
def test_a_bench_script_runs_and_prints_finite_ratios(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *BENCHES[script], "--json"], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    found = ratios(report)
    assert found, sorted(report)
    assert all(math.isfinite(v) and v > 0 for v in found.values()), found
    if script == "onnx_vs_torch.py":  # the same model in both runtimes
        assert report["max_probability_difference"] < 1e-4
