"""Models exported by `aicoss export` to ONNX, run with ONNX Runtime: `OnnxModel`.

An aicoss ONNX file says how to feed it (metadata_props: the source checkpoint's metadata, input
size, normalisation), so `predict` and `ensemble` take one wherever they take a checkpoint.
onnxruntime is imported on use (the `export` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from aicoss_cli.base.errors import UserError, one_line
from aicoss_cli.base.files import file_kind
from aicoss_cli.models.checkpoint import FORMAT, CheckpointMeta

EXTRA_HINT = "pip install 'aicoss[export]'"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


def require_extra(*modules: str) -> None:
    """UserError naming the pip command when an optional module of the `export` extra is missing."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"this needs the `{name}` package, which is not installed: {EXTRA_HINT}") from None


def ort_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # idle ORT threads sleep instead of spinning, leaving the cores to other work between runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are not news
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


def run_session(session, x: Tensor) -> Tensor:
    import numpy as np

    array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]).float()


class OnnxModel:
    """An ONNX file written by `aicoss export`, run with ONNX Runtime.

        model = OnnxModel.load("best.onnx")
        probs = model.probabilities(x)   # x: float32 N×3×S×S normalised, CPU -> float32 N×K

    `meta` is the source checkpoint's metadata (arch, img_size, classes, recipe_toml, split, epoch,
    val_map, prior), rebuilt from the file's metadata_props; `batch` is None for a dynamic batch axis,
    else the fixed batch size, and `probabilities` splits or pads any N to it.
    """

    def __init__(self, path: Path, session, meta: CheckpointMeta, batch: int | None):
        self.path, self.session, self.meta, self.batch = path, session, meta, batch

    @classmethod
    def load(cls, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
             spin: bool = True) -> OnnxModel:
        """`providers`: ONNX Runtime execution providers (default: the CPU); `threads`: its intra-op
        threads (default: ORT's, one per physical core); `spin=False`: its idle threads sleep rather
        than spin between runs (for a loop that decodes on the same cores). UserError (one line) for a missing, corrupt
        or non-aicoss ONNX file, or a missing extra."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: ONNX model not found" if not path.exists() else f"{path}: not a file")
        require_extra("onnxruntime")
        try:
            session = ort_session(path, providers, threads, spin)
        except Exception as exc:  # ORT raises InvalidProtobuf / Fail / ... for damaged files
            kind = file_kind(path)
            if kind is not None:
                raise UserError(f"{path}: is {kind}, not an ONNX model; predict and ensemble take aicoss checkpoints "
                                "(.safetensors) and ONNX exports (.onnx)") from None
            raise UserError(f"{path}: not a readable ONNX model (truncated or corrupt: {one_line(exc)})") from None
        props = dict(session.get_modelmeta().custom_metadata_map)
        if props.get("format") != FORMAT:
            raise UserError(f"{path}: not an aicoss ONNX model (no '{FORMAT}' metadata); "
                            "export one with `aicoss export CHECKPOINT`")
        meta = CheckpointMeta.from_strings(props, str(path))
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise UserError(f"{path}: expected one input '{INPUT_NAME}' and an output '{OUTPUT_NAME}' "
                            f"(found {[i.name for i in inputs]} -> {[o.name for o in outputs]})")
        shape = list(inputs[0].shape)
        size = meta.img_size
        if len(shape) != 4 or shape[1:] != [3, size, size] or inputs[0].type != "tensor(float)":
            raise UserError(f"{path}: input '{INPUT_NAME}' is {inputs[0].type} {shape}, but its metadata says "
                            f"float32 [N, 3, {size}, {size}]")
        batch = shape[0] if isinstance(shape[0], int) else None
        return cls(path, session, meta, batch)

    def probabilities(self, x: Tensor) -> Tensor:
        """float32 N×3×S×S normalised images (CPU) -> float32 N×K probabilities (CPU)."""
        size = self.meta.img_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise UserError(f"{self.path}: takes N×3×{size}×{size} images (got {tuple(x.shape)})")
        if self.batch is None or len(x) == self.batch:
            return run_session(self.session, x) if len(x) else torch.zeros(0, self.meta.num_classes)
        outputs = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            n = len(chunk)
            if n < self.batch:  # a fixed batch axis: pad with copies of the last image, drop their rows
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - n, -1, -1, -1)])
            outputs.append(run_session(self.session, chunk)[:n])
        return torch.cat(outputs) if outputs else torch.zeros(0, self.meta.num_classes)

