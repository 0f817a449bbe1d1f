"""The ground floor: errors, what a person reads (console), where and how models run (runtime,
distributed), the files the tool writes (files), and checks of values read from outside (checks).

Every other package may import `base`; `base` imports nothing of aicoss. Names are imported on
first use (`lazy`): `aicoss --help` imports `base.console` without paying for torch.
"""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "checks": ["is_integer", "is_number", "json_ready"],
    "console": ["LogLines", "clock", "err", "is_main_process", "note", "out", "progress_display"],
    "distributed": ["DistInfo"],
    "errors": ["TrainingStopped", "UserError", "one_line"],
    "files": ["WriteFailed", "atomic_path", "check_output", "check_outputs", "check_writable_folder", "file_kind",
              "new_folder", "process_alive", "read_safetensors", "write_bytes_atomic", "write_safetensors", "write_text_atomic"],
    "runtime": ["Runtime", "autocast", "configure_kernels", "make_runtime", "precision_dtype", "seed_everything",
                "select_device"],
})
