"""The `aicoss` command line: the Typer app, its entry point, and the list of commands.

Each command is a plain function with annotated parameters in a module of this package (which parses,
calls a job and prints; no torch logic); this module registers them, in the order `--help` lists
them. Nothing heavy is imported at module level: `aicoss --help` answers without importing torch.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated

import typer
from rich.markup import escape

from aicoss_cli.base.console import err, is_main_process, tolerate_unencodable
from aicoss_cli.base.errors import TrainingStopped, UserError
from aicoss_cli.cli import cv as cli_cv
from aicoss_cli.cli import data as cli_data
from aicoss_cli.cli import distill as cli_distill
from aicoss_cli.cli import export as cli_export
from aicoss_cli.cli import infer as cli_infer
from aicoss_cli.cli import models as cli_models
from aicoss_cli.cli import report as cli_report
from aicoss_cli.cli import score as cli_score
from aicoss_cli.cli import train as cli_train
from aicoss_cli.cli import tune as cli_tune

app = typer.Typer(
    name="aicoss",
    help="Train, predict, ensemble and benchmark multi-label image classifiers "
    "(the 2023 AICOSS winning recipe as a tool).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from aicoss_cli import __version__

        print(f"aicoss {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    # the options of `aicoss` itself; the app's help text stays the one given to typer.Typer above
    return None


def _flags_take_no_value() -> None:
    """Typer's help shows a flag as `--json <bool>`, as if it took a value (`--json true` is then
    read as an argument): show flags without a type."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_take_no_value", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_take_no_value = True
    TyperOption.display_type_rich = display_type_rich


_flags_take_no_value()

COMMANDS = [
    ("train", cli_train.train),
    ("distill", cli_distill.distill),
    ("validate", cli_train.validate),
    ("recipes", cli_train.recipes),
    ("tune", cli_tune.tune),
    ("predict", cli_infer.predict),
    ("ensemble", cli_infer.ensemble),
    ("benchmark-fp16", cli_infer.benchmark_fp16),
    ("score", cli_score.score),
    ("cv", cli_cv.cv_app),
    ("report", cli_report.report),
    ("count-params", cli_models.count_params),
    ("import-weights", cli_models.import_weights),
    ("prior", cli_models.prior),
    ("export", cli_export.export),
    ("demo-data", cli_data.demo_data),
    ("split", cli_data.split),
]


def _paragraphs(function) -> list[str]:
    """The docstring's paragraphs, each as one flowing line (Typer would keep the docstring's line
    breaks, made for the source file, not for the terminal)."""
    return [" ".join(p.split()) for p in inspect.cleandoc(function.__doc__ or "").split("\n\n") if p.strip()]


# the command list shows each docstring's first paragraph, one short line; `aicoss CMD --help` all of it
for _name, _function in COMMANDS:
    if isinstance(_function, typer.Typer):  # a command family: `aicoss cv summarize`
        app.add_typer(_function, name=_name)
    else:
        app.command(_name, short_help=_paragraphs(_function)[0], help="\n\n".join(_paragraphs(_function)))(_function)


# Typer's (or click's) base class of command-line errors, without importing a private module
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _print_one_line(kind: str, text: str) -> None:
    if is_main_process():
        text = " ".join(text.splitlines())  # a message is one line, whatever it quotes
        err.print(f"[bold {'red' if kind == 'error' else 'yellow'}]{kind}:[/] {escape(text)}", highlight=False,
                  soft_wrap=True)


def main() -> None:
    """Entry point: bad input — a recipe, a file, or the command line itself — is one line on
    stderr and exit code 2, never a traceback or a framed panel."""
    tolerate_unencodable()
    try:
        code = app(prog_name="aicoss", standalone_mode=False)
    except UserError as exc:
        _print_one_line("error", str(exc))
        sys.exit(2)
    except TrainingStopped as exc:
        _print_one_line("stopped", str(exc))
        sys.exit(exc.exit_code)
    except _USAGE_ERROR as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(exc, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            _print_one_line("error", exc.format_message().replace("Value error, ", "").rstrip(". ") + hint)
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code:  # typer.Exit(code), or 130 after Ctrl-C
        sys.exit(code)
