"""cellpipe's packages import each other without cycles, lower layers never higher ones.

Read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` anywhere in a module, also inside functions, relative ones
resolved. A node is a subpackage (``cellpipe.engine``) or a top-level module
(``cellpipe.contract``); ``cellpipe`` itself is the package's ``__init__``.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx

from conftest import REPO

PACKAGE = "cellpipe"
SOURCE = REPO / "src"

# The training stack, lowest first: a package never imports one to its right. The recipe
# search (tuning) calls the stages' core functions, so it sits above them.
TRAINING_LAYERS = ["engine", "gan", "methods", "stages", "tuning"]


def module_name(path: Path, source: Path) -> str:
    """``src/cellpipe/engine/fit.py`` → ``cellpipe.engine.fit`` (a package: its folder)."""
    parts = list(path.relative_to(source).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def node_of(module: str, package: str) -> str | None:
    """The graph node a module belongs to: its subpackage, or itself at the top level;
    None for a module outside ``package``."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return ".".join(parts[:2])


def is_module(name: str, source: Path) -> bool:
    """Whether ``name`` (dotted) is a module or package under ``source``."""
    base = source.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path, module: str, source: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import in ``path``; ``from a import b`` gives
    ``a.b`` where b is a module (``from cellpipe import plots``), else ``a``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:  # relative: up level - 1 packages from this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                origin = f"{parent}.{origin}" if origin else parent
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.append((candidate if is_module(candidate, source) else origin,
                              node.lineno))
    return found


def package_graph(source: Path = SOURCE, package: str = PACKAGE
                  ) -> tuple[nx.DiGraph, dict[tuple[str, str], list[str]]]:
    """The import graph between ``package``'s nodes, and for each edge where it comes
    from (``file:line``)."""
    graph = nx.DiGraph()
    evidence: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted((source / package).rglob("*.py")):
        module = module_name(path, source)
        importer = node_of(module, package)
        graph.add_node(importer)
        for target, line in imported_modules(path, module, source):
            imported = node_of(target, package)
            if imported is None or imported == importer:
                continue
            graph.add_edge(importer, imported)
            where = f"{path.relative_to(source)}:{line}"
            if where not in evidence[importer, imported]:  # one line may import many names
                evidence[importer, imported].append(where)
    return graph, evidence


def describe_cycles(graph: nx.DiGraph, evidence: dict[tuple[str, str], list[str]]) -> str:
    """Every elementary cycle, one a line, each edge with the imports that make it."""
    lines = []
    for found in nx.simple_cycles(graph):
        start = found.index(min(found))  # from its alphabetically first node: stable text
        cycle = found[start:] + found[:start]
        edges = zip(cycle, cycle[1:] + cycle[:1], strict=True)
        lines.append(" -> ".join(cycle + cycle[:1]) + "   via " + "; ".join(
            f"{a}->{b}: {', '.join(evidence[a, b])}" for a, b in edges))
    return "\n".join(sorted(lines))


def test_packages_import_each_other_without_cycles() -> None:
    graph, evidence = package_graph()
    assert "cellpipe.engine" in graph and "cellpipe.contract" in graph  # it read the tree
    cycles = describe_cycles(graph, evidence)
    assert not cycles, f"import cycles between cellpipe's packages:\n{cycles}"


def test_training_layers_import_only_downwards() -> None:
    graph, evidence = package_graph()
    upward = [f"{low} imports {high}: {', '.join(evidence[low, high])}"
              for i, low in enumerate(f"{PACKAGE}.{name}" for name in TRAINING_LAYERS)
              for high in (f"{PACKAGE}.{name}" for name in TRAINING_LAYERS[i + 1:])
              if graph.has_edge(low, high)]
    assert not upward, "\n".join(upward)


def test_only_the_commands_import_the_recipe_search() -> None:
    """Nothing but the command line sits above ``tuning``: no stage, flow helper or
    library module may come to depend on the search."""
    graph, evidence = package_graph()
    importers = {node: evidence[node, f"{PACKAGE}.tuning"]
                 for node in graph.predecessors(f"{PACKAGE}.tuning")}
    assert set(importers) <= {f"{PACKAGE}.commands"}, importers


def test_a_back_import_is_found_inside_functions_and_relative(tmp_path: Path) -> None:
    """The detector itself: a cycle made by a function-level relative import and a
    ``from pkg import module`` is found and named with its lines."""
    root = tmp_path / "pkg"
    for folder in ("low", "high"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("VERSION = 1\n")
    (root / "util.py").write_text("")
    (root / "high" / "a.py").write_text("from pkg.low.b import thing\nfrom pkg import util\n")
    (root / "low" / "b.py").write_text("from pkg import VERSION\n\n\n"
                                       "def thing():\n    from ..high import a\n")
    graph, evidence = package_graph(tmp_path, "pkg")
    assert set(graph.edges) == {("pkg.high", "pkg.low"), ("pkg.high", "pkg.util"),
                                ("pkg.low", "pkg"), ("pkg.low", "pkg.high")}
    assert describe_cycles(graph, evidence) == (
        "pkg.high -> pkg.low -> pkg.high   via pkg.high->pkg.low: pkg/high/a.py:1; "
        "pkg.low->pkg.high: pkg/low/b.py:5")
