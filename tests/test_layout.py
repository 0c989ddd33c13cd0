"""The project's own structure: package names resolve here, and imports point down only."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ["datasets", "models", "tasks", "flows"]
# package -> packages (first-party or prefect) it must never import
FORBIDDEN = {
    "datasets": {"models", "tasks", "flows", "prefect", "prefect_dask"},
    "models": {"datasets", "tasks", "flows", "prefect", "prefect_dask"},
    "tasks": {"flows"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_to_this_checkout(name):
    mod = importlib.import_module(name)
    path = Path(mod.__file__).resolve()
    assert ROOT in path.parents, f"'import {name}' resolves to {path}, not to this project ({ROOT})"


def _imported_top_levels(py: Path) -> set[str]:
    tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    bad = []
    for py in sorted((ROOT / package).rglob("*.py")):
        hits = _imported_top_levels(py) & FORBIDDEN[package]
        if hits:
            bad.append(f"{py.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "layout rule flows -> tasks -> (models, datasets) broken:\n" + "\n".join(bad)


# --- inside tasks/: stages, engines and shared modules ---------------------------------------------

TASKS = ROOT / "tasks"
ENGINES = {"tasks.alignment", "tasks.training", "tasks.evaluation"}
SHARED = {"tasks.runtime", "tasks.stage", "tasks.checkpoint", "tasks.cli", "tasks.configs"}
STAGES = {f"tasks.{p.stem}" for p in TASKS.glob("*.py") if p.stem != "__init__"} - SHARED


def _module_name(py: Path) -> str:
    parts = py.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _home(module: str) -> str:
    """The stage, engine or shared module that ``module`` (``tasks.x[.y]``) belongs to."""
    return ".".join(module.split(".")[:2])


def _first_party_imports(py: Path, module_level: bool = False) -> set[str]:
    """Every ``tasks.*`` and ``prefect*`` module imported in the file (function-local imports too,
    unless ``module_level``)."""
    tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
    names = set()
    for node in (tree.body if module_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "tasks":
                names.update(f"tasks.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in ("tasks", "prefect", "prefect_dask")}


def test_tasks_holds_the_stages_and_the_known_shared_modules():
    expected = {"tasks.align", "tasks.lst", "tasks.pack", "tasks.merge", "tasks.bins", "tasks.gather",
                "tasks.train", "tasks.verification", "tasks.megaface", "tasks.export"}
    assert STAGES == expected, f"tasks/ should hold only stages and {sorted(SHARED)}: {sorted(STAGES ^ expected)}"
    assert {p.name for p in TASKS.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
        e.split(".")[1] for e in ENGINES}
    doc = importlib.import_module("tasks").__doc__
    for module in sorted(STAGES | ENGINES | SHARED):
        assert f":mod:`{module}`" in doc, f"tasks/__init__.py does not map {module}"


def test_each_stage_module_is_named_as_its_prefect_tasks():
    for module in sorted(STAGES):
        py = TASKS / (module.split(".")[1] + ".py")
        names = [kw.value.value for node in ast.walk(ast.parse(py.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "task"
                 for kw in node.keywords if kw.arg == "name"]
        stem = module.split(".")[1]
        assert names, f"{py.name} defines no Prefect task"
        assert all(n == stem or n.startswith(stem + "-") for n in names), f"{py.name} runs tasks named {names}"


def test_stages_never_import_each_other_and_engines_import_no_stage():
    bad = []
    for py in sorted(TASKS.rglob("*.py")):
        me = _module_name(py)
        home = _home(me)
        lazy = me == "tasks.runtime"  # publishes to Prefect only inside a run, importing it then
        for imported in sorted(_first_party_imports(py, module_level=lazy)):
            if imported.startswith("prefect"):
                if home not in STAGES:
                    bad.append(f"{me} imports {imported} (only stages may import prefect)")
                continue
            target = _home(imported)
            if target in STAGES and target != home:
                bad.append(f"{me} imports the stage {target}")
    assert not bad, "rule inside tasks/ broken:\n" + "\n".join(bad)
