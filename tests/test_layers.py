"""The package's layering: a module imports only modules on its own floor or
below (function-level imports included), so there are no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facemt"

#: Ground floor first; STYLE.md explains the order.
FLOORS = [
    {"__init__", "errors", "config", "tasks", "files"},
    {"images", "faces", "synth", "distributed", "shards"},
    {"transforms", "losses", "model", "data", "relative"},
    {"checkpoint", "checks", "splits", "engines", "explain"},
    {"inference", "video"},
    {"engine"},
    {"evaluation", "export"},
    {"report"},
    {"cli", "__main__"},
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "facemt":
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()} or {"__init__"}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("facemt.")}
    return found


def _modules() -> list[tuple[str, Path]]:
    """(floor name, file) of every module; the command line is a package, all of it on the cli floor."""
    return [(p.stem, p) for p in sorted(PACKAGE.glob("*.py"))] + [("cli", p) for p in sorted(PACKAGE.glob("cli/*.py"))]


def test_every_module_has_a_floor():
    modules = {name for name, _ in _modules()}
    assert modules <= set(FLOOR), modules - set(FLOOR)


def test_no_module_imports_one_above_it():
    upward = []
    for name, path in _modules():
        for target in _imports(path):
            if target != name and FLOOR[target] > FLOOR[name]:
                upward.append(f"{path.name} (floor {FLOOR[name]}) imports {target} (floor {FLOOR[target]})")
    assert not upward, upward
