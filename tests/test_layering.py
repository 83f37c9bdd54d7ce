"""Imports run one way: no module of ``trojanscan`` imports from a layer above its own.

The layers, lowest first (a module belongs to the layer of its longest matching
prefix):

0. foundation — ``exceptions``, ``_version``, ``progress``, ``utils``
1. maths and data — ``maths``, ``dataset``, ``archs``, ``serve_options``
2. model and data handling — ``classifier``, ``results``, ``io``
3. building blocks of the methods — ``attacks``, ``features``, ``training``, ``zoo``
4. MNTD's engine — ``mntd``
5. detectors — ``detectors``
6. orchestrators — ``scan``, ``self_reference``, ``data_scan``, ``mitigation``, ``guard``
7. outputs — ``reports`` (and the ``report`` alias), ``serve``, ``fleet``
8. faces — ``commands``, ``cli``, ``__main__``, ``api``, ``testing``, the package itself

Every import counts, also one inside a function (a lazy import is still an arrow);
``from trojanscan import __version__`` is an arrow to ``_version``, where the package
takes it from. The test reads the source with :mod:`ast` and runs nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trojanscan

SRC = Path(trojanscan.__file__).parent
PACKAGE = "trojanscan"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("exceptions", "_version", "progress", "utils"),
    ("maths", "dataset", "archs", "serve_options"),
    ("classifier", "results", "io"),
    ("attacks", "features", "training", "zoo"),
    ("mntd",),
    ("detectors",),
    ("scan", "self_reference", "data_scan", "mitigation", "guard"),
    ("reports", "report", "serve", "fleet"),
    ("commands", "cli", "__main__", "api", "testing", ""),
)

#: Known arrows against the layers, each with what removes it. Empty this as the
#: modules named here move; a stale entry fails the test too.
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of this package that ``name`` (relative to it) is, or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return "" if "" in modules else None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name[len(PACKAGE) + 1:], modules)
                    if target is not None:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == PACKAGE
                                  or node.module.startswith(PACKAGE + ".")):
                stem = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:
                if stem == "" and alias.name == "__version__":
                    found.add("_version")
                    continue
                full = f"{stem}.{alias.name}" if stem else alias.name
                target = full if full in modules else _resolve(stem, modules)
                if target is not None:
                    found.add(target)
    found.discard(module)
    return found


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            hit = module == prefix or (prefix and module.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best < 0:
        raise AssertionError(f"trojanscan.{module} belongs to no layer: add it to LAYERS")
    return best


def upward_arrows() -> set[tuple[str, str]]:
    modules = _modules()
    out: set[tuple[str, str]] = set()
    for module, path in modules.items():
        for target in _imports(module, path, modules):
            if layer_of(target) > layer_of(module):
                out.add((module, target))
    return out


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        layer_of(module)


def test_no_module_imports_from_a_layer_above() -> None:
    arrows = upward_arrows()
    new = sorted(arrows - KNOWN_EXCEPTIONS)
    assert not new, "imports from a higher layer: " + "; ".join(
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})" for a, b in new)


def test_known_exceptions_are_not_stale() -> None:
    stale = sorted(KNOWN_EXCEPTIONS - upward_arrows())
    assert not stale, f"fixed, remove from KNOWN_EXCEPTIONS: {stale}"


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # the package and a subpackage's __init__ re-export their members: not a cycle
    graph = {m: {t for t in ts if not (m == "" or m.startswith(t + ".") or t == "")}
             for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"modules importing each other: {cycles}"


def test_the_checker_sees_an_upward_arrow(tmp_path: Path) -> None:
    """The parser resolves relative imports: a planted arrow is found."""
    modules = {"utils": tmp_path / "utils.py", "reports.report": tmp_path / "r.py",
               "reports": tmp_path / "__init__.py"}
    modules["utils"].write_text("def f():\n    from .reports.report import Report\n")
    assert _imports("utils", modules["utils"], modules) == {"reports.report"}
    assert layer_of("reports.report") > layer_of("utils")
