"""The command line: the Typer app (app) and one module per command family, each a set of plain
functions that parse, call a job and print. No library module imports this package."""

from aicoss_cli.base.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {"app": ["app", "main"]})
