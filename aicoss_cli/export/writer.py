"""Take a model out of aicoss: ONNX and TorchScript files verified against PyTorch as they are
written, and the backbone in timm's naming (`timm_weights`). An exported ONNX file runs in ONNX
Runtime through `infer.onnx_model.OnnxModel`, wherever a checkpoint is taken.

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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from aicoss_cli.base.errors import UserError, one_line
from aicoss_cli.base.files import WriteFailed, atomic_path, check_output, check_writable_folder, new_folder
from aicoss_cli.data.loading import IMAGENET_MEAN, IMAGENET_STD, normalize
from aicoss_cli.export.timm_weights import TIMM_FILES, load_timm, timm_config, timm_parts, write_timm
from aicoss_cli.infer.onnx_model import INPUT_NAME, OUTPUT_NAME, ort_session, require_extra, run_session
from aicoss_cli.models.checkpoint import CheckpointMeta, model_from_checkpoint

FORMATS = ("onnx", "torchscript", "safetensors-timm")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # largest allowed probability difference to the fp32 PyTorch model
CHECK_IMAGES = 4  # images (or random inputs) the exported model is checked on
TRACE_BATCH = 2  # example batch of a dynamic export; the check runs other batch sizes (CHECK_IMAGES and 1)
MAX_BATCH = 4096
PROTOBUF_LIMIT = 2_000_000_000  # one ONNX file holds at most 2 GB (protobuf)
TORCHSCRIPT_META = "aicoss.json"
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


def lowest_opset() -> int:
    """The oldest opset the ONNX exporter writes (its operator library's; older asks get this one)."""
    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    except ImportError:  # a private constant: torch 2.x's value when it moves
        return 18
    return int(TORCHLIB_OPSET)


def _check_options(checkpoint: Path, fmt: str, out: Path, opset: int | None, batch: int | None,
                   overwrite: bool) -> None:
    if opset is not None and fmt != "onnx":
        raise UserError(f"--opset applies to --format onnx only (got --format {fmt})")
    if batch is not None and fmt == "safetensors-timm":
        raise UserError("--batch applies to --format onnx and torchscript only (weights have no batch size)")
    if opset is not None:
        require_extra("onnx")
        import onnx

        lowest, newest = lowest_opset(), onnx.defs.onnx_opset_version()
        if not lowest <= opset <= newest:
            raise UserError(f"--opset must be from {lowest} to {newest}, the opsets this exporter writes and this onnx "
                            f"knows (got {opset})")
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
    if fmt == "safetensors-timm":
        others = sorted(p.name for p in out.iterdir() if p.name not in TIMM_FILES) if out.is_dir() else []
        if others:  # --overwrite replaces what an export writes, never a file it did not write
            raise UserError(f"{out}: holds {len(others)} other file{'s' if len(others) > 1 else ''} (e.g. "
                            f"{others[0]!r}) besides the {' and '.join(TIMM_FILES)} an export writes; give --out a new "
                            "or an export's own folder")
        check_writable_folder(out)
    else:
        check_output(out, [checkpoint], overwrite=True)
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
    from aicoss_cli.data.tables import read_test, read_train

    if (Path(data) / "test.csv").is_file():
        paths, csv = read_test(data).paths, "test.csv"
    else:
        paths, csv = read_train(data).paths, "train.csv"
    if not paths:
        raise UserError(f"{Path(data) / csv}: lists no images to check the export on")
    return paths[:n], f"{Path(data) / csv}"


def check_inputs(img_size: int, data: Path | None, n: int = CHECK_IMAGES,
                 exif_transpose: bool = False) -> tuple[Tensor, str]:
    """n normalised inputs (n×3×S×S float32): real images of `data` decoded as predict does, or
    seeded random inputs; and a phrase saying which."""
    if data is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, img_size, img_size, generator=generator), f"{n} seeded random inputs"
    from aicoss_cli.data.images import decode_batch

    paths, csv = _image_paths(data, n)
    batches, error = decode_batch(paths, [img_size], exif_transpose=exif_transpose)
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
        raise ExportCheckFailed(f"the ONNX exporter failed{where}: {one_line(exc)}") from exc
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportCheckFailed(f"the written ONNX model is not valid: {one_line(exc)}") from exc
    written = [o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")]
    if opset is not None and written != [opset]:
        raise ExportCheckFailed(f"the exporter wrote opset {written[0] if written else '?'}, not the {opset} asked for; "
                                "nothing written")


# --------------------------------------------------------------------------- TorchScript


def _export_torchscript(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, str]) -> None:
    """torch.jit.trace: the format LibTorch (C++) and older PyTorch load. torch.jit is deprecated in
    favour of torch.export (whose .pt2 programs need the same torch to load), hence the filter."""
    buffer = io.BytesIO()  # torch.jit.save aborts the process when a write to a file fails (a full disk)
    try:
        with _quiet():
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_META: json.dumps(metadata)})
    except Exception as exc:
        raise ExportCheckFailed(f"torch.jit.trace failed: {one_line(exc)}") from exc
    try:
        path.write_bytes(buffer.getbuffer())
    except OSError as exc:
        raise WriteFailed(path, exc.strerror or str(exc), buffer.getbuffer().nbytes) from None


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, str]]:
    """A TorchScript export and its metadata (the `aicoss.json` extra file)."""
    extra = {TORCHSCRIPT_META: ""}
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    raw = extra[TORCHSCRIPT_META]
    return module.eval(), json.loads(raw) if raw else {}


@contextlib.contextmanager
def _staged_folder(out: Path):
    """Yield a new folder beside `out` (the umask's mode) to write and check an export in; on
    success its files become `out` (a new folder), or replace their namesakes in `out` (an export's
    own folder: nothing else in it is touched); on error it is removed."""
    try:
        tmp = new_folder(out)
    except OSError as exc:
        raise WriteFailed(out, exc.strerror or str(exc), 0) from None
    try:
        yield tmp
        if out.is_dir():
            for name in TIMM_FILES:
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.rename(tmp, out)
    except WriteFailed as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(out / exc.path.name, exc.reason, exc.needed) from None
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
    inputs, compared = check_inputs(meta.img_size, Path(data) if data is not None else None,
                                    exif_transpose=meta.exif_transpose)
    metadata = export_metadata(meta, checkpoint, precision, batch, fmt)
    notes: list[str] = []
    if fmt == "safetensors-timm":
        return _export_timm(model, meta, metadata, inputs, compared, out, fp16, started, step)

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
    try:
        with atomic_path(out) as tmp, torch.no_grad():
            if fmt == "onnx":
                step("exporting to ONNX")
                _export_onnx(module, example, tmp, opset, batch is None, metadata)
                step("checking with ONNX Runtime")
                session = ort_session(tmp)
                got = [run_session(session, x) for x in batches]
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
    except WriteFailed as exc:  # said of the file the user named, not of its temporary
        raise WriteFailed(out, exc.reason, exc.needed) from None
    if out.suffix != suffix:
        notes.append(f"{out.name}: --format {fmt} files usually end in {suffix}")
    return ExportResult(out, fmt, precision, batch, _describe(compared, batches), "probabilities", max_diff,
                        tolerance, size, time.perf_counter() - started, notes)


def _export_timm(model, meta, metadata, inputs, compared, out, fp16, started, step) -> ExportResult:
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
    with _staged_folder(out) as tmp:
        step("writing timm weights")
        write_timm(parts, config, tmp, torch.float16 if fp16 else torch.float32)
        step("loading them back with timm")
        try:
            with _quiet():
                reloaded = load_timm(tmp)
        except Exception as exc:
            raise ExportCheckFailed(f"timm cannot load the written weights: {one_line(exc)}") from exc
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
