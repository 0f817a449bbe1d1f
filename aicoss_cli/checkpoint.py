"""Checkpoints: safetensors weights + metadata (recipe, classes, epoch, val mAP), written atomically.

Nothing is unpickled: a `.safetensors` file holds tensors and a string-to-string metadata map.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from aicoss_cli.errors import UserError

FORMAT = "aicoss/1"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed to disk and replaces `path`,
    on error it is removed. The file gets the mode any new file gets (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    new_file_mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != new_file_mode:  # a writer that made its own file (safetensors)
            os.chmod(tmp, new_file_mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)  # the rename itself survives a power cut


def _new_temporary(path: Path) -> Path:
    """An empty new file `.<name>.<pid>-<random>.tmp` beside `path`, created with mode 0666 so the
    umask decides its permissions (mkstemp's files stay 0600 after the rename). Temporaries of
    `path` left by a process that is gone (killed mid-write) are removed first."""
    _remove_stale_temporaries(path)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


STALE_AFTER_S = 3600  # a temporary without a pid in its name (older versions) is stale after an hour


def _remove_stale_temporaries(path: Path) -> None:
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):-len(".tmp")].split("-", 1)[0]
        if pid_text.isdigit() and "-" in name[len(prefix):]:
            stale = not process_alive(int(pid_text))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this machine); someone else's counts as running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; a file system that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output(path: str | Path, inputs: Sequence[str | Path] = (), option: str = "--out",
                 overwrite: bool = True) -> None:
    """`path` must be a writable file path that is none of the inputs and, unless `overwrite`, no
    existing file (checked before any compute)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; {option} takes the path of a file")
    target = path.resolve()
    for item in inputs:
        if Path(item).exists() and target == Path(item).resolve():
            raise UserError(f"{path}: is an input of this command ({item}); choose another {option}")
    if not overwrite and path.exists():
        raise UserError(f"{path}: already exists; choose another {option}, or add --overwrite to replace it")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{path}: cannot be written ({ancestor} is not a folder); choose another {option}")
    if ancestor == path.parent:
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=ancestor)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"{path}: cannot be written ({exc.strerror or exc}); choose another {option}") from None
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written ({ancestor} is not writable); choose another {option}")


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

    @property
    def data_root(self) -> Path | None:
        """The `[data] root` of the stored recipe (None if it has none)."""
        import tomllib

        try:
            root = tomllib.loads(self.recipe_toml).get("data", {}).get("root") if self.recipe_toml else None
        except tomllib.TOMLDecodeError:
            return None
        return Path(root) if isinstance(root, str) and root else None

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
            "kind": (lambda v: v in ("random", "stratified"), '"random" or "stratified"'),
            "val_fraction": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
            "split_seed": (lambda v: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
            "n_rows": (lambda v: _integer(v) and v >= 0, "an integer ≥ 0"),
            "n_val": (lambda v: _integer(v) and v >= 0, "an integer ≥ 0"),
            "val_fingerprint": (lambda v: isinstance(v, str), "a string"),
        }
        for key, (ok, expected) in checks.items():
            if key in split and not ok(split[key]):
                raise self.bad("split", f"a valid split: its {key} must be {expected} (got {split[key]!r})")
        return split

    def prior(self, num_classes: int) -> list[float] | None:
        if not self.meta.get("prior"):
            return None
        prior = self.json("prior", "[]", "a list of per-class frequencies")
        if not isinstance(prior, list) or len(prior) != num_classes:
            raise self.bad("prior", f"a list of {num_classes} values, one per class")
        if not all(_number(v) and 0.0 <= v <= 1.0 for v in prior):
            raise self.bad("prior", "a list of frequencies in [0, 1]")
        return [float(v) for v in prior]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class WriteFailed(UserError):
    """A file could not be written (a full disk, a folder gone read-only); the previous file, if
    any, is intact. `needed` is the size of what was being written, in bytes."""

    def __init__(self, path: Path, reason: str, needed: int):
        super().__init__(f"{path}: cannot be written ({reason}; it needs {needed / 2**20:.1f} MiB)")
        self.path, self.reason, self.needed = path, reason, needed


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file atomically (a crash leaves the previous file intact); WriteFailed
    when the disk or the folder refuses it."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except Exception as exc:  # OSError, or safetensors' own error wrapping one
        if not isinstance(exc, OSError) and "SafetensorError" not in type(exc).__name__:
            raise
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise WriteFailed(path, reason, sum(t.numel() * t.element_size() for t in tensors.values())) from None


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write weights and metadata to `path` atomically (a crash leaves the previous file intact)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    write_safetensors(path, _unshare(tensors), meta.to_strings())


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own storage."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -len(out) - 1
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (none when `tensors` is false) and metadata of a .safetensors file; UserError if it
    is missing, truncated or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            values = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable .safetensors file (truncated or corrupt: {reason})") from None
    return values, meta


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


def check_writable_folder(folder: str | Path, option: str = "--out") -> None:
    """`folder` must be a folder that exists or can be made, where files can be written: probed in
    its nearest existing ancestor with a temporary file that is removed at once (nothing is left)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: is a file, not a folder; give a folder")
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {folder}: cannot be made ({ancestor} is not a folder); give another folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".aicoss-probe.", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} {folder}: cannot be written ({exc.strerror or exc} in {ancestor}); "
                        "give a folder you can write to") from None


def check_outputs(outputs: Sequence[Path], inputs: Sequence[str | Path], overwrite: bool) -> None:
    """Every file a job will write: writable, none of its inputs, no two the same, and not an
    existing file unless `overwrite`. Checked before any compute."""
    seen: set[Path] = set()
    for path in map(Path, outputs):
        if path.resolve() in seen:
            raise UserError(f"{path}: two outputs of this command would share this name; give --out another name")
        seen.add(path.resolve())
        check_output(path, inputs, overwrite=overwrite)
