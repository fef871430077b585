"""The package's layout rules (ARCHITECTURE.md): sizes a reader can hold in mind, imports that
go one way, and an engine that knows devices only through their protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamload"
MODULES = sorted(PACKAGE.rglob("*.py"))
LIMITS = {"module": 900, "class": 300, "function": 90}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_level_imports(path: Path) -> set[str]:
    """streamload modules ``path`` imports when it is imported (not inside functions or
    ``if TYPE_CHECKING:`` blocks, which cannot form an import-time cycle)."""
    found: set[str] = set()
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    for node in _tree(path).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    known = {_name(p) for p in MODULES}
    return {name for name in found if name in known}


def test_no_module_class_or_function_is_too_big_to_read() -> None:
    """No module over 900 lines, class over 300, function over 90."""
    big = []
    for path in MODULES:
        tree = _tree(path)
        if len(path.read_text().splitlines()) > LIMITS["module"]:
            big.append(f"{_name(path)} (module)")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                kind = "class"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                kind = "function"
            else:
                continue
            assert node.end_lineno is not None
            if node.end_lineno - node.lineno + 1 > LIMITS[kind]:
                big.append(f"{_name(path)}:{node.name} ({kind})")
    assert [] == big


def test_the_library_never_imports_the_cli() -> None:
    """``streamload.cli`` is a face over the public API: nothing else in the package imports it
    (anywhere, function bodies included) but ``python -m streamload``, which runs it."""
    offenders = []
    for path in MODULES:
        if _name(path).startswith("streamload.cli") or _name(path) == "streamload.__main__":
            continue
        for node in ast.walk(_tree(path)):
            if (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("streamload.cli")
            ) or (
                isinstance(node, ast.Import)
                and any(alias.name.startswith("streamload.cli") for alias in node.names)
            ):
                offenders.append(_name(path))
    assert [] == offenders


def test_imports_have_no_cycles() -> None:
    """The import-time graph of streamload's modules is acyclic (a package's ``__init__`` may
    import its own submodules: edges from a package to its children are left out)."""
    graph = {_name(p): _top_level_imports(p) for p in MODULES}
    for module, targets in graph.items():
        graph[module] = {t for t in targets if t != module and not t.startswith(module + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert [] == cycles


@pytest.mark.parametrize("package", ["engine"])
def test_the_engine_knows_devices_only_through_their_protocol(package: str) -> None:
    """No ``isinstance`` on a concrete device class and no ``getattr`` probing for undeclared
    device attributes in the engine: what it needs, the ``Device`` protocol declares."""
    concrete = {"CpuDevice", "CudaDevice", "SimulatedGPU"}
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                if node.func.id == "isinstance" and names & concrete:
                    offenders.append(f"{_name(path)}:{node.lineno} isinstance")
                if node.func.id == "getattr" and "device" in ast.unparse(node.args[0]):
                    offenders.append(f"{_name(path)}:{node.lineno} getattr")
            if isinstance(node, ast.ImportFrom) and any(a.name in concrete for a in node.names):
                offenders.append(f"{_name(path)}:{node.lineno} imports a device class")
    assert [] == offenders
