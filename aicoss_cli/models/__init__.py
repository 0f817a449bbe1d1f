"""Models: arch name -> multi-label classifier (logits for K classes), and the checkpoint format.

    from aicoss_cli.models import ARCHS, build_model
    model = build_model("tresnet_xl_mldecoder", num_classes=60, pretrained=True)

`zoo` declares every arch (one short builder each), `registry` is the door in (`build_model`,
parameter counts), `backbones` / `ml_decoder` / `query2label` / `fcn` the parts, `pretrained` the
loading of weight files, `checkpoint` the safetensors format every command reads and writes.
Names are imported on first use: importing this package imports no torch.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checkpoint": ["CheckpointMeta", "load_checkpoint", "load_weights", "model_from_checkpoint", "read_meta",
                   "save_checkpoint"],
    "pretrained": ["LoadReport", "load_pretrained_file", "load_state_dict_file"],
    "registry": ["ARCHS", "arch_display", "build_model", "count_parameters", "default_img_size", "get_spec",
                 "input_size_problem", "param_rows"],
})
