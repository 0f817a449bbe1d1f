"""The real CLI in a process that meets a hostile file system: folders made read-only (a read-only
bind mount) or a tiny full disk (a small tmpfs), set up in a private mount namespace (`unshare`),
so nothing outside that one process sees them and nothing stays mounted after it.

Without `unshare`, a non-root user gets read-only folders from `chmod 0555` (root ignores
permissions, so it needs the namespace); a full disk needs the namespace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pytest

from helpers import ROOT


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    after: str  # what the `after` shell command printed (e.g. a listing of the full disk)


@lru_cache(maxsize=1)
def can_unshare() -> bool:
    """Whether this machine lets a process mount a tmpfs in a mount namespace of its own."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", folder],
                               capture_output=True)
    return probe.returncode == 0


AFTER_MARK = "---after---"


def run_aicoss(args: Sequence[str | Path], *, cwd: Path, read_only: Sequence[Path] = (), full: Path | None = None,
               full_kib: int = 64, after: str = "", env: dict[str, str] | None = None) -> Ran:
    """`python -m aicoss_cli ARGS` in `cwd` with `read_only` folders read-only and `full` a tmpfs of
    `full_kib` KiB; `after` runs in the same namespace once the command is done."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "aicoss_cli", *args))
    if can_unshare():
        setup = [f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
                 f"mount -o remount,bind,ro {shlex.quote(str(p))}" for p in read_only]
        if full is not None:
            setup.append(f"mount -t tmpfs -o size={full_kib}k tmpfs {shlex.quote(str(full))}")
        script = " && ".join(setup or ["true"]) + f" || exit 97\ncd {shlex.quote(str(cwd))}\n{command}\nrc=$?\n" \
            f"echo {AFTER_MARK}\n{after}\nexit $rc\n"
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=environment)
        assert proc.returncode != 97, proc.stderr
    else:
        if full is not None or os.geteuid() == 0:
            pytest.skip("needs `unshare` (a private mount namespace) to make a folder read-only or a disk full")
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in read_only}
        for p in read_only:
            p.chmod(0o555)
        try:
            script = f"cd {shlex.quote(str(cwd))}\n{command}\nrc=$?\necho {AFTER_MARK}\n{after}\nexit $rc\n"
            proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=environment)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
    stdout, _, after_text = proc.stdout.partition(AFTER_MARK + "\n")
    return Ran(proc.returncode, stdout, proc.stderr, after_text)


def assert_one_line(ran: Ran, *needles: str, code: int = 2) -> str:
    assert ran.code == code, (ran.code, ran.stdout, ran.stderr)
    message = ran.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, message
    return message
