"""The run folder `OUT/<recipe name>/<UTC timestamp>/`: making a new one, holding it (one `aicoss
train` at a time), stopping cleanly on a signal, and saying what is kept when writing to it fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aicoss_cli.base.errors import TrainingStopped, UserError
from aicoss_cli.base.files import WriteFailed, process_alive, read_safetensors
from aicoss_cli.results.layout import LAST_FILE, LOCK_FILE, STATE_FILE
from aicoss_cli.train.state import TrainProgress


def new_run_dir(out: Path, name: str, suffix: str = "") -> Path:
    """OUT/<name>/<UTC timestamp><suffix>/, never an existing folder."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out) / name
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = base / ((stamp if n == 1 else f"{stamp}-{n}") + suffix)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{base}: could not create a new run folder")


def open_run_dir(info, out: Path, recipe, resume, notes: list[str], folder: Path | None = None) -> Path:
    """The folder a run writes: the resumed one, `folder` when given (a fold of a cross-validation:
    PARENT/fold{k}, made here if it is not there), or a new one under `out` (or under `resume.out`, a
    fork that first copies what the resumed run had written). Rank 0 makes it; every rank gets it."""
    from aicoss_cli.base import distributed
    from aicoss_cli.train.state import fork_run

    if resume is not None and resume.out is None:
        return Path(resume.source)
    if folder is not None:
        if info.main:
            Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    run_dir = new_run_dir(resume.out if resume else out, recipe.name) if info.main else None
    run_dir = Path(distributed.broadcast_object(info, str(run_dir) if run_dir else None))
    if resume is not None and info.main:
        fork_run(resume.source, run_dir)
        notes.append(f"continuing {resume.source} in a new folder; the original is left as it was")
    return run_dir


class RunLock:
    """`.aicoss.lock` in the run folder, holding the pid of the `aicoss train` that writes it: a second
    one (two `--resume` of the same run) is refused; a lock whose process is gone is taken over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                pid = self._owner()
                if pid is not None and pid != os.getpid() and process_alive(pid):
                    raise UserError(f"{self.path.parent}: another `aicoss train` (pid {pid}) is writing this run "
                                    f"folder; wait for it to end, or stop it first") from None
                self.path.unlink(missing_ok=True)  # a lock left by a process that is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat()}, f)
            self.held = True
            return self
        raise UserError(f"{self.path}: cannot take the run folder's lock; remove this file if no run is active")

    def _owner(self) -> int | None:
        try:
            pid = json.loads(self.path.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return None
        return pid if isinstance(pid, int) and pid > 0 else None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def saved_epoch(run_dir: Path) -> str:
    """The epoch of the state file on disk (read from its header only), or "?"."""
    path = Path(run_dir) / STATE_FILE
    try:
        return str(TrainProgress.from_json(read_safetensors(path, tensors=False)[1]["progress"], str(path)).epoch)
    except (UserError, KeyError):
        return "?"


def nonfinite_loss(run_dir: Path, epoch: int, step: int, global_step: int) -> TrainingStopped:
    """The `stopped:` line of a non-finite loss: where, what is kept, the fix."""
    kept = [str(f) for f in (Path(run_dir) / LAST_FILE, Path(run_dir) / STATE_FILE) if f.is_file()]
    what = f"the last good checkpoint ({', '.join(kept)}) is kept" if kept else "no checkpoint had been written yet"
    return TrainingStopped(f"non-finite loss at epoch {epoch + 1}, step {step} (global step {global_step}); the "
                           f"weights were not updated and {what}; lower [optim] lr or use precision = \"fp32\"",
                           diverged=True)


@contextlib.contextmanager
def stop_when_writes_fail(run_dir: Path):
    """A full disk (or a folder gone read-only) stops the run with what is kept and what is needed."""
    try:
        yield
    except (WriteFailed, OSError) as exc:
        raise write_failed(run_dir, exc) from None


def write_failed(run_dir: Path, exc: OSError | WriteFailed) -> TrainingStopped:
    """The `stopped:` line of a full disk or a folder gone read-only: what failed, the space needed,
    what is kept and how to continue."""
    if isinstance(exc, WriteFailed):
        what, needed = f"{exc.path}: {exc.reason}", f"; free at least {exc.needed / 2**20:.0f} MiB there"
    else:
        what, needed = f"{exc.filename or run_dir}: {exc.strerror or exc}", ""
    state = Path(run_dir) / STATE_FILE
    kept = (f"the last saved state ({state}, epoch {saved_epoch(run_dir)}) is intact" if state.is_file()
            else "no resumable state was saved yet")
    return TrainingStopped(f"writing to {run_dir} failed ({what}){needed}; {kept}: continue with "
                           f"`aicoss train --resume {run_dir}`", exit_code=1)


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary; a second Ctrl-C is immediate."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def ignore_sigint(_worker_id: int) -> None:
    # loader workers must survive Ctrl-C so the main process can save a clean checkpoint
    signal.signal(signal.SIGINT, signal.SIG_IGN)
