"""The checkpoint format: safetensors weights + metadata (arch, input size, classes, the resolved
recipe, epoch, val mAP, the val split), written atomically, read back strictly, and the model a
checkpoint was trained as rebuilt from it.

Nothing is unpickled: a `.safetensors` file holds tensors and a string-to-string metadata map.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aicoss_cli.base.checks import is_integer, is_number
from aicoss_cli.base.errors import UserError
from aicoss_cli.base.files import read_safetensors, unshare, write_safetensors

FORMAT = "aicoss/1"


@dataclass
class CheckpointMeta:
    """What a checkpoint knows about itself: enough to rebuild the model and its data split."""

    arch: str
    img_size: int
    classes: list[str]
    recipe_toml: str = ""
    epoch: int = 0
    val_map: float | None = None
    split: dict[str, Any] = field(default_factory=dict)
    prior: list[float] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _data_key(self, key: str) -> Any:
        """A `[data]` key of the stored recipe (None if it has none)."""
        import tomllib

        try:
            return tomllib.loads(self.recipe_toml).get("data", {}).get(key) if self.recipe_toml else None
        except tomllib.TOMLDecodeError:
            return None

    @property
    def data_root(self) -> Path | None:
        """The `[data] root` of the stored recipe (None if it has none)."""
        root = self._data_key("root")
        return Path(root) if isinstance(root, str) and root else None

    @property
    def exif_transpose(self) -> bool:
        """The stored recipe's `[data] exif_transpose`: its images were turned upright by their EXIF
        orientation, so every prediction must turn them too."""
        return self._data_key("exif_transpose") is True

    def resolve_data_root(self, data: str | Path | None, source: str) -> Path:
        """`data` when given, else the stored recipe's data root."""
        if data is not None:
            return Path(data)
        if self.data_root is None:
            raise UserError(f"{source}: no data root in its stored recipe; pass --data DIR")
        return self.data_root

    def check_classes(self, classes: list[str], source: str, csv: Path) -> None:
        """The data's classes must be this checkpoint's, names and order."""
        if list(classes) == self.classes:
            return
        if sorted(classes) == sorted(self.classes):
            detail = "the same names in another order"
        else:
            missing = [c for c in self.classes if c not in classes]
            extra = [c for c in classes if c not in self.classes]
            detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
        raise UserError(f"{source}: trained on {self.num_classes} classes but {csv} has {len(classes)} "
                        f"({detail}); pass the --data it was trained on")

    def to_strings(self) -> dict[str, str]:
        from aicoss_cli import __version__

        out = {
            "format": FORMAT,
            "aicoss_version": __version__,
            "arch": self.arch,
            "img_size": str(self.img_size),
            "num_classes": str(len(self.classes)),
            "classes": json.dumps(self.classes),
            "recipe": self.recipe_toml,
            "epoch": str(self.epoch),
            "val_map": "" if self.val_map is None or not math.isfinite(self.val_map) else repr(float(self.val_map)),
            "split": json.dumps(self.split),
        }
        if self.prior is not None:
            out["prior"] = json.dumps([float(v) for v in self.prior])
        out.update(self.extra)
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str], source: str) -> CheckpointMeta:
        """Parse and range-check the metadata as strictly as a recipe is checked: a hand-edited
        checkpoint must not make `predict` build a 100000-pixel model."""
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{source}: not an aicoss checkpoint (no '{FORMAT}' metadata); "
                "convert a seed .pt state dict with `aicoss import-weights`"
            )
        check = _MetaCheck(meta, source)
        classes = check.classes()
        known = {"format", "aicoss_version", "arch", "img_size", "num_classes", "classes", "recipe",
                 "epoch", "val_map", "split", "prior"}
        return cls(
            arch=check.arch(),
            img_size=check.integer("img_size", IMG_SIZE_MIN, IMG_SIZE_MAX, f"an integer between {IMG_SIZE_MIN} and "
                                   f"{IMG_SIZE_MAX} (as [model] img_size)"),
            classes=classes,
            recipe_toml=meta.get("recipe", ""),
            epoch=check.integer("epoch", 0, None, "an integer ≥ 0", default=0),
            val_map=check.val_map(),
            split=check.split(),
            prior=check.prior(len(classes)),
            extra={k: v for k, v in meta.items() if k not in known},
        )


IMG_SIZE_MIN, IMG_SIZE_MAX = 16, 4096  # [model] img_size of a recipe, and of a checkpoint


class _MetaCheck:
    """Field-by-field checks of a checkpoint's string metadata; each error names the checkpoint,
    the key and what it must be."""

    def __init__(self, meta: dict[str, str], source: str):
        self.meta, self.source = meta, source

    def bad(self, key: str, expected: str) -> UserError:
        if key not in self.meta:
            return UserError(f"{self.source}: checkpoint metadata has no '{key}' (it must be {expected}); "
                             "use a checkpoint written by `aicoss train` or `aicoss import-weights`")
        value = self.meta[key]
        shown = repr(value if len(value) <= 60 else value[:57] + "...")
        return UserError(f"{self.source}: checkpoint metadata {key} = {shown} is not {expected}; the file was "
                         "edited or damaged: use an unedited checkpoint")

    def json(self, key: str, default: str, expected: str):
        try:
            return json.loads(self.meta.get(key) or default)
        except json.JSONDecodeError:
            raise self.bad(key, f"{expected} (valid JSON)") from None

    def integer(self, key: str, low: int, high: int | None, expected: str, default: int | None = None) -> int:
        text = self.meta.get(key, "")
        if not text and default is not None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self.bad(key, expected) from None
        if value < low or (high is not None and value > high):
            raise self.bad(key, expected)
        return value

    def arch(self) -> str:
        arch = self.meta.get("arch", "")
        if not arch.strip():
            raise self.bad("arch", "an architecture name")
        return arch

    def classes(self) -> list[str]:
        expected = "a non-empty list of class names"
        if "classes" not in self.meta:
            raise self.bad("classes", expected)
        classes = self.json("classes", "[]", expected)
        if not isinstance(classes, list) or not classes:
            raise self.bad("classes", expected)
        if not all(isinstance(c, str) and c.strip() for c in classes):
            raise self.bad("classes", f"{expected} (non-empty strings)")
        twice = next((c for i, c in enumerate(classes) if c in classes[:i]), None)
        if twice is not None:
            raise self.bad("classes", f"{expected} with each name once ({twice!r} twice)")
        if self.meta.get("num_classes") not in (None, "", str(len(classes))):
            raise self.bad("num_classes", f"the length of 'classes' ({len(classes)} classes)")
        return classes

    def val_map(self) -> float | None:
        text = self.meta.get("val_map", "")
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise self.bad("val_map", "empty or a number in [0, 1]") from None
        if math.isnan(value):  # older versions wrote an undefined mAP so
            return None
        if not 0.0 <= value <= 1.0:
            raise self.bad("val_map", "empty or a number in [0, 1]")
        return value

    def split(self) -> dict[str, Any]:
        split = self.json("split", "{}", "a table")
        if not isinstance(split, dict):
            raise self.bad("split", "a table (kind, val_fraction, split_seed, ...)")
        checks = {
            "kind": (lambda v: v in ("random", "stratified", "kfold"), '"random", "stratified" or "kfold"'),
            "val_fraction": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
            "split_seed": (lambda v: is_integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
            "n_rows": (lambda v: is_integer(v) and v >= 0, "an integer ≥ 0"),
            "n_val": (lambda v: is_integer(v) and v >= 0, "an integer ≥ 0"),
            "val_fingerprint": (lambda v: isinstance(v, str), "a string"),
            "folds": (lambda v: is_integer(v) and 2 <= v <= 2**31, "an integer ≥ 2"),  # a fold of K-fold CV
            "fold": (lambda v: is_integer(v) and 0 <= v < int(split.get("folds", 0)), "an integer in [0, folds)"),
            "folds_fingerprint": (lambda v: isinstance(v, str), "a string"),
        }
        for key, (ok, expected) in checks.items():
            if key in split and not ok(split[key]):
                raise self.bad("split", f"a valid split: its {key} must be {expected} (got {split[key]!r})")
        if split.get("kind") == "kfold" and not all(k in split for k in ("folds", "fold")):
            raise self.bad("split", "a valid split: a kfold split records folds and fold")
        return split

    def prior(self, num_classes: int) -> list[float] | None:
        if not self.meta.get("prior"):
            return None
        prior = self.json("prior", "[]", "a list of per-class frequencies")
        if not isinstance(prior, list) or len(prior) != num_classes:
            raise self.bad("prior", f"a list of {num_classes} values, one per class")
        if not all(is_number(v) and 0.0 <= v <= 1.0 for v in prior):
            raise self.bad("prior", "a list of frequencies in [0, 1]")
        return [float(v) for v in prior]


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write weights and metadata to `path` atomically (a crash leaves the previous file intact)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_safetensors(path, unshare(tensors), meta.to_strings())


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    tensors, meta = read_safetensors(path)
    return tensors, CheckpointMeta.from_strings(meta, str(path))


def read_meta(path: str | Path) -> CheckpointMeta:
    """Metadata only (no tensor is read): cheap, for listings and compatibility checks."""
    return CheckpointMeta.from_strings(read_safetensors(path, tensors=False)[1], str(path))


def model_from_checkpoint(path: str | Path, skip_init: bool = True) -> tuple[torch.nn.Module, CheckpointMeta]:
    """Rebuild the model a checkpoint was trained as and load its weights (eval mode, CPU).

    With `skip_init` the model is built on the meta device (no memory, no random initialisation,
    which takes seconds for large models) and takes the checkpoint's tensors as its own; a model
    that cannot be built that way, or that computes tensors the checkpoint does not hold
    (non-persistent buffers), is built the normal way."""
    from aicoss_cli.models import build_model

    state, meta = load_checkpoint(path)
    if skip_init:
        try:
            with torch.device("meta"):
                model = build_model(meta.arch, meta.num_classes, pretrained=False, img_size=meta.img_size)
        except UserError:
            raise
        except Exception:  # builders that need real tensors at set-up
            model = None
        if model is not None and _same_layout(model.state_dict(), state):
            model.load_state_dict(state, strict=True, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model.eval(), meta
    model = build_model(meta.arch, meta.num_classes, pretrained=False, img_size=meta.img_size)
    load_weights(model, state, str(path), f"arch {meta.arch!r} with {meta.num_classes} classes")
    return model.eval(), meta


def _same_layout(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Strict load with a one-line error that says how the file and the model differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"{source}: weights do not fit {what}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


