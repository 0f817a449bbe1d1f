"""Export: a checkpoint's model as ONNX, TorchScript or timm weights, each checked against
PyTorch as it is written (writer), and the timm side of the timm export (timm_weights)."""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "timm_weights": ["load_timm"],
    "writer": ["ExportCheckFailed", "ExportResult", "export_checkpoint", "load_torchscript"],
})
