"""The package structure: every module imports alone, the import graph has no cycle, and imports
between packages run one way (docs/architecture.md draws it).

Imports are read with `ast`, function-level ones and those under `if TYPE_CHECKING:` included.
The rules are the tables below: adjust them there when the layout changes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# From the top down: a module may import modules of its own layer and of the layers below it.
# "pkg.*" is the package and everything in it; a name without ".*" is that module alone.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry",
        (
            "sandbox.__main__",
            "sandbox.bundle",
            "sandbox.cli",
            "sandbox.commands",
            "sandbox.options",
            "sandbox.launch",
            "sandbox.report",
            "sandbox.doctor.*",
        ),
    ),
    ("run/backends", ("sandbox.run.*", "sandbox.backends.*", "sandbox.budgets.*", "fallback.*")),
    ("cgroups/registry", ("sandbox.cgroups.*", "sandbox.registry.*")),
    ("core", ("sandbox.core.*", "sandbox")),
)
# Packages that may import, besides themselves, only these (the rlimit backend must work where
# no cgroup exists: sandbox.cgroups may join the list if it is ever truly needed).
ONLY: dict[str, tuple[str, ...]] = {"fallback.*": ("sandbox.core.*",)}
# Type-only imports (under TYPE_CHECKING) allowed against the direction, each with its reason.
TYPE_ONLY_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("sandbox.registry.store", "sandbox.backends.protocol"): (
        "registering a sandbox takes a Backend; the Protocol is only its type"
    ),
}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("sandbox", "fallback"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        package = pattern[:-2]
        return module == package or module.startswith(package + ".")
    return module == pattern


def layer(module: str) -> int:
    found = [i for i, (_, names) in enumerate(LAYERS) if any(matches(module, n) for n in names)]
    assert len(found) == 1, f"{module} is in {len(found)} layers of LAYERS: add it to one"
    return found[0]


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module of ours, whether only under TYPE_CHECKING), from the source."""
    tree = ast.parse(MODULES[module].read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            type_only.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from sandbox import report`: the module sandbox.report, else a name in sandbox.
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in MODULES
                else node.module
                for alias in node.names
            ]
        else:
            assert not isinstance(node, ast.ImportFrom), f"{module}: a relative import"
            continue
        for name in names:
            while name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in MODULES and name != module:
                found.append((name, id(node) in type_only))
    return found


GRAPH = {module: imports(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_module_imports_alone(module: str) -> None:
    """In a fresh interpreter, with nothing imported before it (an import-order cycle fails).
    sandbox.__main__ runs the CLI when imported: every host test runs it."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1 being visited, 2 done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target, _ in GRAPH[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_imports_run_one_way() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        for target, type_only in targets:
            if layer(target) < layer(module):
                if type_only and (module, target) in TYPE_ONLY_EXCEPTIONS:
                    continue
                wrong.append(
                    f"{module} ({LAYERS[layer(module)][0]}) imports {target} "
                    f"({LAYERS[layer(target)][0]})"
                )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_restricted_packages_import_only_what_they_may() -> None:
    wrong = []
    for package, allowed in ONLY.items():
        for module, targets in GRAPH.items():
            if not matches(module, package):
                continue
            for target, _ in targets:
                if not any(matches(target, p) for p in (package, *allowed)):
                    wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer(module)
