"""Model registry: arch name -> multi-label classifier (logits for K classes).

    from aicoss_cli.models import ARCHS, build_model
    model = build_model("tresnet_xl_mldecoder", num_classes=60, pretrained=True)

Importing this package is cheap: timm and transformers are imported by the builders only.
"""

from aicoss_cli.models import zoo as _zoo  # noqa: F401  (registers every arch)
from aicoss_cli.models.pretrained import LoadReport, load_pretrained_file, load_state_dict_file
from aicoss_cli.models.registry import (
    ARCHS,
    arch_display,
    build_model,
    count_parameters,
    default_img_size,
    param_rows,
)

__all__ = [
    "ARCHS",
    "LoadReport",
    "arch_display",
    "build_model",
    "count_parameters",
    "default_img_size",
    "load_pretrained_file",
    "load_state_dict_file",
    "param_rows",
]
