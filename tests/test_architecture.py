"""The shape of the package: imports run one way (DESIGN.md's module map), no import circle, no
module that has grown past one concern's size, every re-exported name resolves, and the Python API
the docs promise imports."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from helpers import ROOT, help_in_fresh_python

PACKAGE = ROOT / "aicoss_cli"
# a package imports only packages of a lower rank; packages of one rank never import each other
RANK = {"base": 0, "models": 1, "losses": 1, "data": 1, "evaluation": 2, "recipe": 2, "results": 3, "infer": 4,
        "train": 5, "export": 5, "tune": 6, "cli": 7}
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every aicoss_cli module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("aicoss_cli"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aicoss_cli")}
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_belongs_to_a_package_of_the_map():
    packages = {_package(m) for m in _modules()} - {None, "__main__"}
    assert packages == set(RANK), packages ^ set(RANK)


def test_imports_run_one_way():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        a = _package(module)
        for dep in _imports(path, modules):
            b = _package(dep)
            if a in RANK and b in RANK and a != b and RANK[b] >= RANK[a]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_train_and_export_never_import_each_other_nor_models_and_data():
    modules = _modules()
    for module, path in modules.items():
        for dep in _imports(path, modules):
            assert {_package(module), _package(dep)} not in ({"train", "export"}, {"models", "data"}), (module, dep)


def test_no_library_module_imports_the_cli():
    modules = _modules()
    for module, path in modules.items():
        if _package(module) not in ("cli", "__main__"):
            assert not any(_package(d) == "cli" for d in _imports(path, modules)), module


def test_there_is_no_import_circle():
    modules = _modules()
    graph = {m: {d for d in _imports(p, modules) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_module_is_longer_than_one_concern_needs():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("package", sorted(set(RANK) - {"recipe"}))
def test_every_name_a_package_re_exports_resolves_to_its_own_module(package):
    pkg = importlib.import_module(f"aicoss_cli.{package}")
    assert pkg.__all__, package
    for name in pkg.__all__:
        value = getattr(pkg, name)
        if inspect.isfunction(value) or inspect.isclass(value):  # constants and instances carry no home
            assert value.__module__.startswith(f"aicoss_cli.{package}."), (package, name, value.__module__)
    with pytest.raises(AttributeError):
        getattr(pkg, "no_such_name")


def test_the_python_api_of_the_docs_imports():
    from aicoss_cli.evaluation import mean_average_precision
    from aicoss_cli.infer import run_predict
    from aicoss_cli.losses import build_loss
    from aicoss_cli.models import ARCHS, build_model
    from aicoss_cli.train import Callback, Trainer
    from aicoss_cli.tune import TrialRecipes, load_space, tune

    assert "resnet18_mldecoder" in ARCHS and callable(build_model) and callable(build_loss)
    assert mean_average_precision([[1, 0], [0, 1]], [[0.9, 0.1], [0.2, 0.8]]) == 1.0
    assert all(callable(f) for f in (run_predict, Trainer, Callback, TrialRecipes, load_space, tune))


def test_help_and_the_light_commands_import_no_torch():
    _, modules = help_in_fresh_python("--help", also_import=("aicoss_cli.base.console", "aicoss_cli.results.layout",
                                                             "aicoss_cli.data", "aicoss_cli.models"))
    assert "torch" not in modules, "torch imported"
