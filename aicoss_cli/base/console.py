"""What a person reads: the two consoles, progress displays, and plain log lines for log files.

Results go to `out` (stdout), progress and messages to `err` (stderr). When a stream is not a
terminal (a pipe, a log file, a cluster job), lines are never wrapped (a table title neither),
tables are laid out at their natural width instead of at Rich's 80-column default (COLUMNS, when
set, caps them), and there is no live bar, which would only show its last state and leave a blank
line behind: loops print plain lines instead (`LogLines`). Numbers in a table are never cut
(`print_table`), and a character the terminal cannot encode is escaped, not a traceback
(`tolerate_unencodable`). This module imports no torch.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty()
    wide = piped and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=1000 if wide else None, soft_wrap=piped)


out = _console(stderr=False)
err = _console(stderr=True)


def is_main_process() -> bool:
    """Whether this process prints: under torchrun only rank 0 does (read from the environment, so
    asking needs no torch)."""
    return int(os.environ.get("RANK", "0")) == 0


def tolerate_unencodable() -> None:
    """stdout and stderr escape what their encoding cannot write (`\\xe9` under PYTHONIOENCODING=ascii
    or a C locale) instead of raising in the middle of a result."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


def print_table(table, console: Console | None = None) -> None:
    """Print a Rich table whose numbers are never cut: a right-justified (numeric) column is at least
    as wide as its widest cell and never wraps, names fold (at least 12 characters of them shown per
    line); a table that needs more than the console's width is laid out at what it needs, not
    cropped (the terminal wraps its lines)."""
    console = console or out
    widths = []
    for column in table.columns:
        widest = max((console.measure(cell).maximum for cell in column.cells), default=0)
        if column.justify == "right":
            column.min_width, column.no_wrap = max(column.min_width or 0, widest), True
        else:
            column.min_width = max(column.min_width or 0, min(widest, 12))
        column.overflow = "fold"
        widths.append(column.min_width)
    _, right, _, left = table.padding
    needed = sum(widths) + (left + right) * len(widths) + (len(widths) + 1 if table.box else 0)
    if needed > console.width:
        table.width = needed
    console.print(table, crop=False)


def note(text: str, console: Console | None = None) -> None:
    """A yellow `note:` line (the text is printed as is, never as markup)."""
    (console or out).print(f"[yellow]note:[/] {escape(text)}", highlight=False)


def progress_display(console: Console | None = None, enabled: bool = True, transient: bool = False):
    """A Rich progress display: description, bar, count, free-text stats (loss, img/s), elapsed, ETA.
    It redraws 4 times a second: each redraw holds the GIL that decoding in this process needs.
    Off where the console is not a terminal (Rich would print a blank line when it stops)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Stats(ProgressColumn):
        def render(self, task):
            return Text(str(task.fields.get("stats", "")))

    console = console or err
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Stats(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not (enabled and console.is_interactive), transient=transient, refresh_per_second=4)


class LogLines:
    """When the output is not a terminal, a progress bar shows nothing until the loop ends: say
    when to print a plain line instead — every tenth of the loop, or every minute if sooner."""

    def __init__(self, steps: int, enabled: bool, every_s: float = 60.0):
        self.enabled, self.tenth, self.every_s, self.last = enabled, max(1, steps // 10), every_s, 0.0
        self.steps = steps

    def due(self, step: int, elapsed: float) -> bool:
        if not self.enabled or step >= self.steps:  # the loop's own closing line follows
            return False
        if step % self.tenth and elapsed - self.last < self.every_s:
            return False
        self.last = elapsed
        return True


def clock(seconds: float) -> str:
    """0:07, 12:34 or 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
