"""The shape of the house, checked from the source: the core names no framework, and no
package module imports itself round in a circle.

Read with `ast` (every `import`, at module level or inside a function), so the test holds
for code paths no other test happens to run. `TYPE_CHECKING` blocks count for the
framework rule (the core names no framework even for type checkers) but not for cycles
(they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vit_core", "vit_torch", "vit_flax", "vit_onnx", "conversion")
# Names the framework-neutral core may never import: frameworks, and the backends, which it
# reaches only through `vit_core.backend.REGISTRY` (module names as strings).
FORBIDDEN_IN_CORE = ("torch", "torchvision", "torchao", "jax", "jaxlib", "flax", "optax")
FORBIDDEN_IN_CORE += ("onnx", "onnxruntime", "onnxscript", "tensorflow")
FORBIDDEN_IN_CORE += ("vit_torch", "vit_flax", "vit_onnx", "conversion")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """The import statements inside `if TYPE_CHECKING:` blocks."""
    return {
        node
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }


def imported_names(path: Path, type_checking: bool = True) -> set[str]:
    """Every module `path` imports: `import a.b` -> a.b; `from a import b` -> a.b and a."""
    names = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if type_checking else _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_file_of_the_core_imports_a_framework_or_a_twin() -> None:
    offenders = []
    for name, path in package_modules().items():
        if name.split(".")[0] != "vit_core":
            continue
        for imported in sorted(imported_names(path)):
            if imported.split(".")[0] in FORBIDDEN_IN_CORE:
                offenders.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offenders, "\n".join(offenders)


def test_import_vit_core_loads_no_framework() -> None:
    """Importing the core and every one of its modules pulls in no framework."""
    core = [n for n in package_modules() if n.split(".")[0] == "vit_core" and "__main__" not in n]
    script = (
        "import importlib, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN_IN_CORE!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports (a package's own __init__ left out
    of its submodules' edges: importing `a.b` runs `a/__init__` by Python's rules, not by
    the module's choice)."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        imported = imported_names(path, type_checking=False)
        targets = {m for m in imported if m in modules and m != name}
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_between_package_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"a"}}, True)],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], has_cycle: bool) -> None:
    assert (find_cycle(graph) is not None) == has_cycle
