"""Inference: THE forward loop and its members (forward), where members come from (members),
`predict`, `ensemble`, `benchmark-fp16`, ONNX models in ONNX Runtime, and seed weights imported.

    from aicoss_cli.infer import run_predict
    result = run_predict("runs/demo/<timestamp>/best.safetensors", split="val")
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "benchmark": ["run_benchmark"],
    "ensemble": ["EnsembleRun", "fit_weights", "run_ensemble"],
    "forward": ["Member", "MemberSource", "combine", "forward", "load_members"],
    "import_weights": ["import_weights"],
    "members": ["discover_runs", "read_spec", "val_split"],
    "onnx_model": ["OnnxModel"],
    "predict": ["PredictResult", "run_predict"],
})
