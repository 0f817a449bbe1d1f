"""Files the tool writes: the one atomic write, folder creation that follows the umask, the checks
of output paths made before any compute, and safetensors reading and writing.

Every file goes to a temporary name beside its target and is renamed at the end, so a crash never
leaves a truncated file; new files and folders get the mode the user's umask gives. This module
imports no torch (safetensors' torch half is imported when a tensor file is read or written).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from aicoss_cli.base.errors import UserError

if TYPE_CHECKING:
    import torch


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


class WriteFailed(UserError):
    """A file could not be written (a full disk, a folder gone read-only); the previous file, if
    any, is intact. `needed` is the size of what was being written, in bytes."""

    def __init__(self, path: Path, reason: str, needed: int):
        super().__init__(f"{path}: cannot be written ({reason}; it needs {needed / 2**20:.1f} MiB)")
        self.path, self.reason, self.needed = path, reason, needed


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` atomically (`atomic_path`); WriteFailed when the disk or the folder refuses it,
    with no temporary left."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    except OSError as exc:
        raise WriteFailed(path, exc.strerror or str(exc), len(data)) from None


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


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        kind = file_kind(path)
        if kind is not None and kind != "a .safetensors file":
            raise UserError(f"{path}: is {kind}, not a .safetensors checkpoint") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable .safetensors file (truncated or corrupt: {reason})") from None
    return values, meta


def file_kind(path: str | Path) -> str | None:
    """What a file is, told by its first bytes (None when unknown): for a message about a file given
    where another kind was expected, e.g. a TorchScript model named .onnx."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return "a zip archive"
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "a TorchScript model (aicoss export --format torchscript; load it with torch.jit.load)"
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch file (torch.save)"
        return "a zip archive"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "a .safetensors file"
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG"):
        return "an image"
    return None


def new_folder(out: Path) -> Path:
    """An empty new folder `.<name>.<random>` beside `out`, created with mode 0777 so the umask
    decides its permissions (mkdtemp's folders stay 0700 after the rename)."""
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{out.parent}: no free temporary name for {out.name}")
