"""The package layering of docs/architecture.md, read from the code's own imports (lazy ones included).

A package may import only the packages the table allows, so that the loop stays on top and no lower
package can come to depend on it; an import circle between modules fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launcher"

# package (a folder of launcher/, or a top-level module) -> the other packages it may import, besides
# launcher.errors. Keep in step with the table in docs/architecture.md.
ALLOWED = {
    "loop": {"tasks", "data", "models", "parallel", "checkpoint", "faults", "tracking", "config", "schedulers"},
    "parallel": {"checkpoint"},
    "tracking": {"config", "faults"},  # faults.lease.pid_start: whose wandb temp folder is stale
    "checkpoint": {"faults", "config"},
    "models": {"data"},
    "config": {"tasks", "faults"},
    "slurm": {"faults"},
    "data": {"tasks"},
    "faults": set(),
    "tasks": set(),
    "schedulers": set(),
    "errors": set(),
    "cli": {"slurm", "tracking", "checkpoint", "loop"},
    "__main__": {"cli"},
    "__init__": {"loop", "tasks", "faults"},
}


def _package(module: str) -> str:
    """'launcher.faults.lease' -> 'faults'; 'launcher.config' -> 'config'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The launcher modules `path` imports, at any depth of the file (lazy imports in functions too).
    `from launcher.data import images` imports the submodule `launcher.data.images`, not the package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("launcher"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("launcher"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in LAUNCHER.rglob("*.py")}
    return {name: {m for m in _imports(path, set(paths)) if m in paths and m != name} for name, path in paths.items()}


def test_every_package_imports_only_what_the_layering_allows():
    graph = _graph()
    packages = {_package(m) for m in graph}
    assert packages == set(ALLOWED), "a package was added or removed: give it a row in ALLOWED and the docs"
    wrong = sorted(f"{src} imports {dst}" for src, dsts in graph.items() for dst in dsts
                   if _package(dst) not in ALLOWED[_package(src)] | {_package(src), "errors"})
    assert wrong == []


def test_no_import_circle_between_modules():
    edges = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []
