"""The package layers, bottom up, and no module cycles.

visionfm_core (ML, never imports Flower or Ray) <- strategies, certs <- strategies.protocol (what the site
and the coordinator both speak) <- client (the site), server.federation (the coordinator's round logic)
<- server.ops (the coordinator's operations plane) <- server (its CLI) <- simulations (the orchestrator).
A package may import its own modules and any package of a lower layer, never one of its own layer or
above. Every import counts, also those inside functions; only `if TYPE_CHECKING:` imports (which never
run) are left out of the module-cycle check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LAYERS: list[list[str]] = [
    ["visionfm_core"],
    ["strategies", "certs"],
    ["strategies.protocol"],
    ["client", "server.federation"],
    ["server.ops"],
    ["server"],
    ["simulations"],
]
PACKAGES = ("visionfm_core", "strategies", "certs", "client", "server", "simulations")


def test_visionfm_core_never_imports_flower_or_ray() -> None:
    code = (
        "import importlib, pkgutil, sys, visionfm_core\n"
        "mods = list(pkgutil.walk_packages(visionfm_core.__path__, 'visionfm_core.'))\n"
        "for m in mods:\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('flwr', 'ray'))\n"
        "print(len(mods), bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert int(done.stdout.split()[0]) > 20  # the walk really covered the package


def project_modules() -> dict[str, Path]:
    """Every module of the six packages (the bundled data folder holds no code of ours)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("simulations", "data"):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _longest_module(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement anywhere in the tree, with whether it sits under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _imports(node, type_only)


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported project module: whether only under TYPE_CHECKING}. `from p import name` points
    at the module `p.name` when there is one, else at `p` (the usual rule of import graphs)."""
    graph: dict[str, dict[str, bool]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, bool] = {}
        for node, type_only in _imports(ast.parse(path.read_text(), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_longest_module(a.name, modules) for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else _longest_module(base, modules))
            for target in targets:
                if target and target != module:
                    edges[target] = edges.get(target, True) and type_only
        graph[module] = edges
    return graph


def package_of(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for level, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (
                    best is None or len(package) > len(best[1])):
                best = (level, package)
    assert best is not None, module
    return best


def layer_violations(graph: dict[str, dict[str, bool]]) -> list[str]:
    bad = []
    for module, edges in sorted(graph.items()):
        mine = package_of(module)
        for target in sorted(edges):
            theirs = package_of(target)
            if theirs[1] != mine[1] and theirs[0] >= mine[0]:
                bad.append(f"{module} ({mine[1]}) imports {target} ({theirs[1]})")
    return bad


def module_cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), run-time imports only."""
    runtime = {m: [t for t, type_only in edges.items() if not type_only] for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in runtime.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(runtime):
        if module not in index:
            visit(module)
    return cycles


def test_packages_import_only_downwards() -> None:
    modules = project_modules()
    assert len(modules) > 150  # the walk really covered the code
    bad = layer_violations(import_graph(modules))
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_module_cycles_lazy_imports_included() -> None:
    cycles = module_cycles(import_graph(project_modules()))
    assert not cycles, "module cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_lazy_imports_and_cycles(tmp_path: Path) -> None:
    """The checks themselves: an import inside a function is an edge, a type-only one is not a cycle."""
    code = {"a": "def f():\n    from b import x\n", "b": "import a\nx = 1\n",
            "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import d\n", "d": "import c\n"}
    modules = {}
    for name, text in code.items():
        (tmp_path / f"{name}.py").write_text(text)
        modules[name] = tmp_path / f"{name}.py"
    graph = import_graph(modules)
    assert graph["a"] == {"b": False} and graph["c"] == {"d": True}
    assert module_cycles(graph) == [["a", "b"]]
    # and a site module importing the coordinator breaks the layers
    assert layer_violations({"client.x": {"server.federation.rounds": False}}) == [
        "client.x (client) imports server.federation.rounds (server.federation)"]
