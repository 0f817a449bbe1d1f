"""Take a model out of aicoss: ONNX and TorchScript files verified against PyTorch as they are
written, the backbone in timm's naming, and ONNX Runtime inference (`OnnxModel`).

Every exported model takes `images`, float32 N×3×S×S, RGB resized to S×S (bilinear) and normalised
as training did ((pixel / 255 − ImageNet mean) / std), and returns `probabilities`, the sigmoid of
the logits, float32 N×K. The file says so itself: the checkpoint's metadata (arch, input size,
classes, recipe, split, epoch, val mAP) plus the mean/std and the source checkpoint are stored in
the ONNX model's `metadata_props` (TorchScript: the extra file `aicoss.json`; timm: `config.json`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from aicoss_cli.checkpoint import FORMAT, CheckpointMeta, atomic_path, model_from_checkpoint
from aicoss_cli.data import IMAGENET_MEAN, IMAGENET_STD, normalize
from aicoss_cli.errors import UserError

FORMATS = ("onnx", "torchscript", "safetensors-timm")
EXTRA_HINT = "pip install 'aicoss[export]'"
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # largest allowed probability difference to the fp32 PyTorch model
CHECK_IMAGES = 4  # images (or random inputs) the exported model is checked on
TRACE_BATCH = 2  # example batch of a dynamic export; the check runs other batch sizes (CHECK_IMAGES and 1)
MAX_BATCH = 4096
PROTOBUF_LIMIT = 2_000_000_000  # one ONNX file holds at most 2 GB (protobuf)
TORCHSCRIPT_META = "aicoss.json"
TIMM_WEIGHTS, TIMM_CONFIG = "model.safetensors", "config.json"
INPUT_FORMAT = "float32 N×3×S×S RGB resized to S×S (bilinear), (pixel/255 - mean) / std"


class ExportCheckFailed(Exception):
    """The exported model does not compute what the PyTorch model computes (or could not be
    written); nothing was left at the output path. The CLI exits with code 1."""


@dataclass
class ExportResult:
    """What `export_checkpoint` wrote and how it was checked."""

    path: Path
    fmt: str
    precision: str  # fp32 | fp16
    batch: int | None  # None: dynamic
    compared: str  # what the check ran on, e.g. "4 images of data/demo/test.csv, batches of 4 and 1"
    quantity: str  # what was compared: "probabilities" or "backbone features (relative)"
    max_diff: float
    tolerance: float
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- options


def require_extra(*modules: str) -> None:
    """UserError naming the pip command when an optional module of the `export` extra is missing."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"this needs the `{name}` package, which is not installed: {EXTRA_HINT}") from None


def parse_batch(value: str | int | None) -> int | None:
    """"dynamic" -> None; a positive integer (as text) -> that fixed batch size."""
    if value is None or str(value).strip().lower() == "dynamic":
        return None
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH:
        raise UserError(f"--batch must be 'dynamic' or an integer from 1 to {MAX_BATCH} (got {value!r})")
    return int(text)


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint: <stem>.onnx, <stem>.pt or the folder <stem>_timm/."""
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "safetensors-timm": "_timm"}[fmt]
    return checkpoint.with_name(checkpoint.stem + suffix)


def _check_options(checkpoint: Path, fmt: str, out: Path, opset: int | None, batch: int | None,
                   overwrite: bool) -> None:
    if opset is not None and fmt != "onnx":
        raise UserError(f"--opset applies to --format onnx only (got --format {fmt})")
    if batch is not None and fmt == "safetensors-timm":
        raise UserError("--batch applies to --format onnx and torchscript only (weights have no batch size)")
    if opset is not None:
        require_extra("onnx")
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not 7 <= opset <= newest:
            raise UserError(f"--opset must be from 7 to {newest}, the newest this onnx knows (got {opset})")
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: checkpoint not found")
    if checkpoint.suffix.lower() == ".onnx":
        raise UserError(f"{checkpoint}: is an exported model already; export takes the .safetensors checkpoint")
    if out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out}: that is the checkpoint itself; choose another --out")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another --out or pass --overwrite (nothing is overwritten)")
    if out.exists() and (out.is_dir() != (fmt == "safetensors-timm")):
        kind = "a folder" if out.is_dir() else "a file"
        raise UserError(f"{out}: is {kind}, and --format {fmt} writes {'a folder' if fmt == 'safetensors-timm' else 'a file'}; "
                        "choose another --out")
    if fmt == "onnx":
        require_extra("onnx", "onnxruntime", "onnxscript")


# --------------------------------------------------------------------------- the exported module


class Probabilities(nn.Module):
    """`images` (float32, normalised) -> sigmoid probabilities (float32); the model may run in fp16.

    The cast in and out keeps the file's interface float32 whatever the precision inside, and the
    sigmoid of an fp16 logit is taken in fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.model(images.to(self.dtype)).float())


def export_metadata(meta: CheckpointMeta, checkpoint: Path, precision: str, batch: int | None,
                    fmt: str) -> dict[str, str]:
    """The checkpoint's own metadata plus what a runtime needs to feed the file."""
    from aicoss_cli import __version__

    strings = meta.to_strings()
    strings.update(
        input=INPUT_NAME,
        output=OUTPUT_NAME,
        input_format=INPUT_FORMAT,
        mean=json.dumps(list(IMAGENET_MEAN)),
        std=json.dumps(list(IMAGENET_STD)),
        source_checkpoint=str(checkpoint),
        precision=precision,
        batch="dynamic" if batch is None else str(batch),
        exported_as=fmt,
        exported_by=f"aicoss {__version__}, torch {torch.__version__}",
    )
    return strings


# --------------------------------------------------------------------------- check inputs


def _image_paths(data: Path, n: int) -> tuple[list[str], str]:
    """The first `n` images listed in the data root's test.csv (train.csv when there is none)."""
    from aicoss_cli.data import read_test, read_train

    if (Path(data) / "test.csv").is_file():
        paths, csv = read_test(data).paths, "test.csv"
    else:
        paths, csv = read_train(data).paths, "train.csv"
    if not paths:
        raise UserError(f"{Path(data) / csv}: lists no images to check the export on")
    return paths[:n], f"{Path(data) / csv}"


def check_inputs(img_size: int, data: Path | None, n: int = CHECK_IMAGES) -> tuple[Tensor, str]:
    """n normalised inputs (n×3×S×S float32): real images of `data` decoded as predict does, or
    seeded random inputs; and a phrase saying which."""
    if data is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, img_size, img_size, generator=generator), f"{n} seeded random inputs"
    from aicoss_cli.inference import decode_batch

    paths, csv = _image_paths(data, n)
    batches, error = decode_batch(paths, [img_size])
    if error:
        raise UserError(f"{error}; --data {data} must point at readable images")
    return normalize(batches[0]).contiguous(), f"{len(paths)} images of {csv}"


def _check_batches(inputs: Tensor, batch: int | None) -> list[Tensor]:
    """Dynamic: all inputs in one batch, then the first alone (neither is the traced batch size).
    Fixed N: one batch of N, the inputs repeated as needed."""
    if batch is None:
        return [inputs, inputs[:1]]
    reps = math.ceil(batch / len(inputs))
    return [inputs.repeat(reps, 1, 1, 1)[:batch].contiguous()]


def _describe(compared: str, batches: list[Tensor]) -> str:
    return f"{compared}, batch{'es' if len(batches) > 1 else ''} of {' and '.join(str(len(b)) for b in batches)}"


def max_difference(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Largest |got − want| over all outputs (inf when anything is not finite)."""
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise ExportCheckFailed(f"the exported model returns shape {tuple(g.shape)}, PyTorch {tuple(w.shape)}")
        if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
            return math.inf
        worst = max(worst, float((g.double() - w.double()).abs().max()) if g.numel() else 0.0)
    return worst


def _judge(max_diff: float, tolerance: float, what: str, reference: Sequence[Tensor]) -> None:
    if not all(torch.isfinite(r).all() for r in reference):
        raise ExportCheckFailed(f"the PyTorch model's own {what} are not finite (damaged weights?); nothing written")
    if not max_diff <= tolerance:
        raise ExportCheckFailed(f"the exported model differs from PyTorch by {max_diff:.3g} in its {what} "
                                f"(allowed {tolerance:g}); nothing written")


# --------------------------------------------------------------------------- ONNX


def _export_onnx(module: nn.Module, example: Tensor, path: Path, opset: int | None, dynamic: bool,
                 metadata: dict[str, str]) -> None:
    """Write `module` as one ONNX file with `metadata` in its metadata_props.

    The dynamo exporter (torch.export, torch 2.14's default; needs onnxscript): it verifies
    for every registered arch, while the legacy TorchScript exporter (dynamo=False) is deprecated
    and cannot export the fused fast path nn.TransformerEncoderLayer takes in eval mode (Q2L's
    encoder) without switching that off. Weights are kept inside the one file (external_data=False)."""
    param_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    if param_bytes > PROTOBUF_LIMIT:
        raise ExportCheckFailed(f"the model's {param_bytes / 1e9:.1f} GB of weights exceed what one ONNX file "
                                "can hold (2 GB); export with --fp16 or --format torchscript")
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, external_data=False,
                  verbose=False, report=False)
    if dynamic:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with _quiet():
            program = torch.onnx.export(module, (example,), **kwargs)
            program.model.metadata_props.update(metadata)
            program.model.doc_string = (f"aicoss {metadata['arch']}: {INPUT_NAME} ({INPUT_FORMAT}) -> "
                                        f"{OUTPUT_NAME} (sigmoid, N×{metadata['num_classes']})")
            program.save(str(path), external_data=False)
    except ExportCheckFailed:
        raise
    except Exception as exc:  # an exporter failure is reported in one line, with nothing written
        where = f" at opset {opset}" if opset is not None else ""
        raise ExportCheckFailed(f"the ONNX exporter failed{where}: {_one_line(exc)}") from exc
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportCheckFailed(f"the written ONNX model is not valid: {_one_line(exc)}") from exc


def _ort_session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 spin: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:  # idle ORT threads sleep instead of spinning, leaving the cores to other work between runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are not news
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"]))


def _run_session(session, x: Tensor) -> Tensor:
    import numpy as np

    array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]).float()


# --------------------------------------------------------------------------- TorchScript


def _export_torchscript(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, str]) -> None:
    """torch.jit.trace: the format LibTorch (C++) and older PyTorch load. torch.jit is deprecated in
    favour of torch.export (whose .pt2 programs need the same torch to load), hence the filter."""
    try:
        with _quiet():
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps(metadata)})
    except Exception as exc:
        raise ExportCheckFailed(f"torch.jit.trace failed: {_one_line(exc)}") from exc


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """A TorchScript export and its metadata (the `aicoss.json` extra file)."""
    extra = {TORCHSCRIPT_META: ""}
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[TORCHSCRIPT_META]
    return module.eval(), json.loads(raw) if raw else {}


# --------------------------------------------------------------------------- timm


@dataclass
class TimmParts:
    """How an aicoss model's backbone maps to a timm model."""

    name: str  # timm model name, e.g. "resnet50"
    state: dict[str, Tensor]  # in timm's naming
    model_args: dict  # what timm.create_model needs besides the name (num_classes, global_pool, img_size)
    with_classifier: bool  # True: the whole network (FCN rows); False: the backbone (our head is not timm's)
    backbone: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]


def timm_parts(model: nn.Module, arch: str) -> TimmParts:
    """The timm model inside an aicoss model, its state dict in timm's naming, and the input
    statistics its weights were trained on. UserError for a backbone that is not a timm model."""
    from aicoss_cli.models.fcn import BackboneClassifier, LinearClassifier

    backbone = getattr(model, "backbone", None)
    if backbone is None or not type(backbone).__module__.startswith("timm.") or not hasattr(backbone, "pretrained_cfg"):
        what = type(backbone).__name__ if backbone is not None else type(model).__name__
        origin = "Hugging Face transformers" if "transformers" in type(getattr(backbone, "cvt", backbone)).__module__ else "aicoss's own"
        raise UserError(f"{arch}: its backbone ({what}, {origin}) is not a timm model, so there are no timm weights "
                        "to write; use --format onnx (or torchscript)")
    cfg = backbone.pretrained_cfg
    name = cfg.get("architecture") or type(backbone).__name__.lower()
    args = dict(getattr(backbone, "_model_args", {}))
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    if isinstance(model, LinearClassifier):
        # Our `cls` is the timm model's own classifier slot: the whole network, in timm's naming.
        classifier = cfg.get("classifier")
        if not isinstance(classifier, str):
            raise UserError(f"{arch}: timm's {name} names no single classifier layer; use --format onnx")
        state[f"{classifier}.weight"] = model.cls.weight.detach()
        state[f"{classifier}.bias"] = model.cls.bias.detach()
        args["num_classes"] = model.cls.out_features
        with_classifier = True
    else:
        with_classifier = isinstance(model, BackboneClassifier)
    mean, std = _backbone_statistics(model)
    return TimmParts(name, state, args, with_classifier, backbone, mean, std)


def _backbone_statistics(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the input the backbone sees: ImageNet's, or what an InputRenorm maps them to
    (x_dst = x·scale + shift, scale = std_src/std_dst, shift = (mean_src − mean_dst)/std_dst)."""
    renorm = getattr(model, "renorm", None)
    if renorm is None:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    scale, shift = renorm.scale.flatten().double(), renorm.shift.flatten().double()
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) / scale
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) - shift * std
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def timm_config(parts: TimmParts, meta: CheckpointMeta, metadata: dict[str, str]) -> dict:
    """config.json in the layout timm's `save_for_hf` writes (so `timm.create_model("local-dir:DIR",
    pretrained=True)` reads it), plus an `aicoss` section."""
    size = meta.img_size
    cfg = parts.backbone.pretrained_cfg
    num_classes = int(parts.model_args.get("num_classes", 0))
    pretrained_cfg = {
        "input_size": [3, size, size],
        "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
        "interpolation": "bilinear",
        "crop_pct": 1.0,  # training resized the whole image to S×S: no crop
        "crop_mode": "center",
        "mean": list(parts.mean),
        "std": list(parts.std),
        "num_classes": num_classes,
        "first_conv": cfg.get("first_conv"),
        "classifier": cfg.get("classifier"),
    }
    config = {
        "architecture": parts.name,
        "num_classes": num_classes,
        "num_features": int(getattr(parts.backbone, "num_features", 0)),
        "model_args": parts.model_args,
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
    }
    if parts.model_args.get("global_pool"):
        config["global_pool"] = parts.model_args["global_pool"]
    if parts.with_classifier:
        config["label_names"] = list(meta.classes)
    config["aicoss"] = {
        "arch": meta.arch,
        "timm_model": parts.name,
        "contents": "the whole network, classifier included" if parts.with_classifier
        else f"the backbone only (the {meta.arch} head is aicoss's own; export --format onnx for the whole model)",
        "num_classes": meta.num_classes,
        "classes": list(meta.classes),
        "img_size": size,
        "input_mean": list(parts.mean),
        "input_std": list(parts.std),
        "aicoss_input_mean": list(IMAGENET_MEAN),
        "aicoss_input_std": list(IMAGENET_STD),
        "source_checkpoint": metadata["source_checkpoint"],
        "epoch": meta.epoch,
        "val_map": meta.val_map,
        "precision": metadata["precision"],
        "exported_by": metadata["exported_by"],
    }
    return config


def load_timm(folder: str | Path, pretrained_file: bool = True) -> nn.Module:
    """The timm model of a safetensors-timm export, built and loaded by timm itself, the way a user
    would: `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), ...)`."""
    import timm

    folder = Path(folder)
    config = json.loads((folder / TIMM_CONFIG).read_text(encoding="utf-8"))
    args = dict(config.get("model_args", {}))
    overlay = dict(file=str(folder / TIMM_WEIGHTS), num_classes=int(config["num_classes"]))
    return timm.create_model(config["architecture"], pretrained=pretrained_file, pretrained_cfg_overlay=overlay,
                             **args).eval()


def _write_timm(parts: TimmParts, config: dict, folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    from aicoss_cli.checkpoint import _unshare

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in parts.state.items()}
    save_file(_unshare(tensors), str(folder / TIMM_WEIGHTS), metadata={"format": "pt"})
    (folder / TIMM_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _atomic_dir(path: Path, overwrite: bool):
    """Yield a temporary folder beside `path`; on success it becomes `path` (an old one is replaced
    only with `overwrite`), on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- the one entry point


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    fp16: bool = False,
    batch: int | None = None,
    data: str | Path | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint's model, check it against the fp32 PyTorch model on CHECK_IMAGES inputs
    (real images of `data`, else seeded random ones), and only then put it at `out`.

    onnx / torchscript: the whole model with its sigmoid, compared in probabilities (ONNX with
    ONNX Runtime's CPU provider, TorchScript reloaded from disk); safetensors-timm: the timm model
    loaded back by timm, compared in probabilities (whole network) or backbone features.
    ExportCheckFailed above TOLERANCE (1e-4, fp16: 1e-2); UserError for bad options or input."""
    started = time.perf_counter()
    step = on_step or (lambda text: None)
    checkpoint = Path(checkpoint)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    _check_options(checkpoint, fmt, out, opset, batch, overwrite)
    precision = "fp16" if fp16 else "fp32"
    tolerance = TOLERANCE[precision]

    step("loading the checkpoint")
    model, meta = model_from_checkpoint(checkpoint)
    inputs, compared = check_inputs(meta.img_size, Path(data) if data is not None else None)
    metadata = export_metadata(meta, checkpoint, precision, batch, fmt)
    notes: list[str] = []
    if fmt == "safetensors-timm":
        return _export_timm(model, meta, metadata, inputs, compared, out, fp16, overwrite, started, step)

    module = Probabilities(model).eval()
    batches = _check_batches(inputs, batch)
    with torch.inference_mode():
        reference = [module(x) for x in batches]
    if fp16:
        module = Probabilities(model.half(), torch.float16).eval()
        notes.append(f"fp16 weights and arithmetic inside, float32 {INPUT_NAME} and {OUTPUT_NAME}; checked "
                     f"against the fp32 PyTorch model to {tolerance:g}")
    example = batches[0][:TRACE_BATCH] if batch is None else batches[0]
    if batch is None and len(example) < TRACE_BATCH:
        example = example.repeat(TRACE_BATCH, 1, 1, 1)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    with atomic_path(out) as tmp:
        with torch.no_grad():
            if fmt == "onnx":
                step("exporting to ONNX")
                _export_onnx(module, example, tmp, opset, batch is None, metadata)
                step("checking with ONNX Runtime")
                session = _ort_session(tmp)
                got = [_run_session(session, x) for x in batches]
                if fp16:
                    notes.append("ONNX Runtime's CPU provider runs fp16 nodes that have no fp16 kernel in fp32 "
                                 "(inserted casts): this check covers the graph and its fp16 weights; fp16 "
                                 "arithmetic itself runs on a GPU provider")
            else:
                step("tracing to TorchScript")
                _export_torchscript(module, example, tmp, metadata)
                step("checking the saved TorchScript")
                loaded, _ = load_torchscript(tmp)
                with torch.inference_mode():
                    got = [loaded(x).float() for x in batches]
        max_diff = max_difference(got, reference)
        _judge(max_diff, tolerance, "probabilities", reference)
        size = tmp.stat().st_size
    if out.suffix != suffix:
        notes.append(f"{out.name}: --format {fmt} files usually end in {suffix}")
    return ExportResult(out, fmt, precision, batch, _describe(compared, batches), "probabilities", max_diff,
                        tolerance, size, time.perf_counter() - started, notes)


def _export_timm(model, meta, metadata, inputs, compared, out, fp16, overwrite, started, step) -> ExportResult:
    parts = timm_parts(model, meta.arch)
    precision = "fp16" if fp16 else "fp32"
    tolerance = TOLERANCE[precision]
    with torch.inference_mode():
        if parts.with_classifier:
            reference = torch.sigmoid(model(inputs).float())
        else:
            renorm = getattr(model, "renorm", None)
            backbone_in = renorm(inputs) if renorm is not None else inputs
            reference = parts.backbone(backbone_in).float()
    config = timm_config(parts, meta, metadata)
    with _atomic_dir(out, overwrite) as tmp:
        step("writing timm weights")
        _write_timm(parts, config, tmp, torch.float16 if fp16 else torch.float32)
        step("loading them back with timm")
        try:
            with _quiet():
                reloaded = load_timm(tmp)
        except Exception as exc:
            raise ExportCheckFailed(f"timm cannot load the written weights: {_one_line(exc)}") from exc
        with torch.inference_mode():
            if parts.with_classifier:
                got = torch.sigmoid(reloaded(inputs).float())
                quantity = "probabilities"
                max_diff = max_difference([got], [reference])
            else:
                got = reloaded(backbone_in)  # num_classes=0, global_pool="": the feature map, as ours
                quantity = "backbone features (relative to their largest value)"
                scale = float(reference.abs().max()) if reference.numel() else 1.0
                max_diff = max_difference([got.float()], [reference]) / max(scale, 1e-12)
        _judge(max_diff, tolerance, quantity, [reference])
        size = sum(p.stat().st_size for p in tmp.iterdir())
    notes = [] if parts.with_classifier else [
        f"{meta.arch}: the folder holds the {parts.name} backbone only (num_classes=0); the head is aicoss's own"]
    return ExportResult(out, "safetensors-timm", precision, None, compared, quantity, max_diff, tolerance, size,
                        time.perf_counter() - started, notes)


# --------------------------------------------------------------------------- ONNX inference


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
            session = _ort_session(path, providers, threads, spin)
        except Exception as exc:  # ORT raises InvalidProtobuf / Fail / ... for damaged files
            raise UserError(f"{path}: not a readable ONNX model (truncated or corrupt: {_one_line(exc)})") from None
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
            return _run_session(self.session, x) if len(x) else torch.zeros(0, self.meta.num_classes)
        outputs = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            n = len(chunk)
            if n < self.batch:  # a fixed batch axis: pad with copies of the last image, drop their rows
                chunk = torch.cat([chunk, chunk[-1:].expand(self.batch - n, -1, -1, -1)])
            outputs.append(_run_session(self.session, chunk)[:n])
        return torch.cat(outputs) if outputs else torch.zeros(0, self.meta.num_classes)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, log messages, tracer and deprecation warnings are not for our users."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "transformers")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (text[:200] + "...") if len(text) > 200 else text
