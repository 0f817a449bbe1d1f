"""The `aicoss` command line: the Typer app, its entry point, and the list of commands.

Each command is a plain function with annotated parameters in a `cli_*.py` module (which parses,
calls a job and prints; no torch logic); this module registers them, in the order `--help` lists
them. Nothing heavy is imported at module level: `aicoss --help` answers without importing torch.
"""

from __future__ import annotations

import inspect
import os
import sys

import typer
from rich.markup import escape

from aicoss_cli import cli_inference, cli_models, cli_train
from aicoss_cli.console import err
from aicoss_cli.errors import TrainingStopped, UserError
from aicoss_cli import cli_export

app = typer.Typer(
    name="aicoss",
    help="Train, predict, ensemble and benchmark multi-label image classifiers "
    "(the 2023 AICOSS winning recipe as a tool).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

COMMANDS = [
    ("train", cli_train.train),
    ("validate", cli_train.validate),
    ("recipes", cli_train.recipes),
    ("predict", cli_inference.predict),
    ("ensemble", cli_inference.ensemble),
    ("benchmark-fp16", cli_inference.benchmark_fp16),
    ("count-params", cli_models.count_params),
    ("import-weights", cli_models.import_weights),
    ("prior", cli_models.prior),
    ("export", cli_export.export),
    ("demo-data", cli_train.demo_data),
    ("split", cli_train.split),
]


def _summary(function) -> str | None:
    """The command list shows the docstring's first paragraph as one flowing line (Typer would keep
    the docstring's line breaks there)."""
    if not function.__doc__:
        return None
    return " ".join(inspect.cleandoc(function.__doc__).split("\n\n")[0].split())


for _name, _function in COMMANDS:
    app.command(_name, short_help=_summary(_function))(_function)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except UserError as exc:
        if _is_main_process():
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except TrainingStopped as exc:
        if _is_main_process():
            err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
