"""Which of cellpipe's source files a module runs: the code a stage depends on.

One answer for two users that must agree: dvc.yaml lists these files as a stage's
deps (a test checks it), and a training run's fingerprint hashes them, so a
persisted checkpoint is resumed exactly when DVC would not rerun the stage for a
code change. Found by reading ``import`` statements (anywhere in a file, also
inside functions), not by importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "cellpipe"
_SRC = Path(__file__).resolve().parents[1]  # the folder that holds the package


def imported_code(module: str) -> list[Path]:
    """Source files of ``module`` and every cellpipe module it imports, transitively.

    Package ``__init__.py`` files are followed but not listed: they hold no stage
    code (the version string, docstrings).
    """
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = _source(name)
        if name in found or path is None:
            continue  # seen, or an attribute (``from cellpipe.x import function``)
        found[name] = path
        pending += _imports(path, name)
    return sorted(path for path in found.values() if path.name != "__init__.py")


def _source(name: str) -> Path | None:
    """The file of module ``name``, if it is one of cellpipe's modules or packages."""
    if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
        return None
    base = _SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, name: str) -> list[str]:
    """Module names ``path`` imports (relative ones resolved), and ``from`` targets that
    may be submodules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                origin = f"{parent}.{origin}" if origin else parent
            names += [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
    return names
