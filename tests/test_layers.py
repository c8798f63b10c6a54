"""The import structure: layers point down (reports -> benchmarks -> methods -> ssl_common) and no module
imports another that imports it back, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ssl_common", "methods", "benchmarks", "reports")
# the command-line entry points compose every layer (`run` rebuilds the report at the end; `reproduce` plans
# with the report's pairing, runs through `run` and tables): they may import upwards, and nothing imports them
ENTRY_POINTS = {"benchmarks.cli", "benchmarks.__main__", "benchmarks.evaluate_cli", "benchmarks.reproduce",
                "reports.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body (module level and inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # `from benchmarks.evaluation import knn` imports the module benchmarks.evaluation.knn
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_module_imports_another_that_imports_it_back():
    edges = graph()
    # a package's __init__ importing its own submodules is not a cycle of two modules
    def is_parent(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a.startswith(b + ".")

    back = sorted((a, b) for a, targets in edges.items() for b in targets
                  if a in edges.get(b, set()) and not is_parent(a, b))
    assert not back, f"modules that import each other: {back}"
    # and no longer cycle either (depth-first search over the module graph)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if is_parent(node, target):
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_layers_point_down():
    rank = {package: i for i, package in enumerate(PACKAGES)}  # ssl_common < methods < benchmarks < reports
    upward = []
    for source, targets in graph().items():
        if source in ENTRY_POINTS:
            continue
        for target in targets:
            if rank[target.split(".")[0]] > rank[source.split(".")[0]]:
                upward.append((source, target))
    assert not upward, f"imports that point up a layer: {sorted(upward)}"


def test_methods_import_nothing_from_benchmarks():
    offenders = sorted((s, t) for s, targets in graph().items() if s.split(".")[0] in ("methods", "ssl_common")
                       for t in targets if t.split(".")[0] in ("benchmarks", "reports"))
    assert not offenders, offenders


def test_the_walker_sees_imports_inside_functions(tmp_path):
    # the check above would be worthless if function-level imports were missed
    modules = project_modules()
    assert "methods" in imports_of(REPO / "benchmarks" / "config.py", modules)  # imported inside resolve_method
