"""Lazy re-exports for the subpackages' `__init__.py` (PEP 562).

Each subpackage re-exports its public names, so a file can move inside a package without breaking
a user's `from aicoss_cli.data import read_train`. Importing them eagerly would make every import
of the package pay for all of it (torch, pandas): `aicoss --help` imports `aicoss_cli.base.console`,
and `aicoss score` needs no torch. So a name is imported from its module when it is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]],
                                                                        list[str]]:
    """`__getattr__`, `__dir__` and `__all__` of `package`: each name of `modules[module]` is
    `package.module.name`, imported on first use."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
