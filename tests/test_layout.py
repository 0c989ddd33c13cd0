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
