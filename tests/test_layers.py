"""The import layers: ir <- pipeline <- ops <- passes <- backends <- frontends, tools, testing, facade.

A module may import only from its own layer or a layer to its left. Every import counts: at module
level or inside a function (a lazy import is still a dependency), ``import x``, ``from x import y``,
relative imports, and ``importlib.import_module("...")`` with a literal name. The modules are read
with ``ast``, not imported, so a violation is reported even in code no test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# where each installed package's sources live (pyproject's package-dir mapping)
SOURCES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes", "graphopt.backends": ROOT / "backends"}

LAYERS = ["ir", "pipeline", "ops", "passes", "backends", "top"]
_LAYER_OF_SUBPACKAGE = {"ir": 0, "pipeline": 1, "ops": 2, "passes": 3, "backends": 4, "frontends": 5, "tools": 5}

# the only modules allowed directly in graphopt/, outside the sub-packages
TOP_LEVEL_MODULES = {"__init__", "__main__", "testing"}


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module graphopt installs."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            if package == "graphopt" and parts and parts[0] in ("passes", "backends"):
                continue  # not a source folder of graphopt (the mapping points elsewhere)
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def layer(module: str) -> int | None:
    """The layer index of a graphopt module, or None for a module outside graphopt."""
    parts = module.split(".")
    if parts[0] != "graphopt":
        return None
    if len(parts) == 1:
        return 5  # the facade
    return _LAYER_OF_SUBPACKAGE.get(parts[1], 5)  # graphopt.testing, graphopt.__main__: top


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def _resolve(importer: str, name: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``importer``."""
    if not level:
        return name or ""
    package = importer if _is_package(importer) else importer.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path``, the module named ``module``.

    ``from package import name`` imports the submodule ``package.name`` when there is one, else
    ``package`` itself (``from graphopt import ir`` is the IR layer; ``from graphopt import optimize``
    the facade).
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.module, node.level)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                target = node.args[0].value
                level = len(target) - len(target.lstrip("."))
                found.append((node.lineno, _resolve(module, target[level:] or None, level) if level else target))
    return found


def upward_imports() -> list[str]:
    """Every import of a higher layer, as ``module:line imports target (layer -> higher layer)``."""
    bad = []
    for module, path in MODULES.items():
        own = layer(module)
        for line, target in imports(module, path):
            theirs = layer(target)
            entry = f"{module}:{line} imports {target} ({LAYERS[own]} -> {LAYERS[theirs]})" if theirs is not None and theirs > own else None
            if entry and entry not in bad:  # `from x import a, b` is one import
                bad.append(entry)
    return bad


def test_the_walk_sees_every_layer():
    # guards the walk itself: a broken source mapping would find nothing and pass vacuously
    assert {layer(m) for m in MODULES} == set(range(len(LAYERS)))
    assert "graphopt.passes.canonicalize" in MODULES and "graphopt.backends.partition" in MODULES


def test_no_module_imports_a_higher_layer():
    bad = upward_imports()
    assert not bad, "imports against the layer order (ir <- pipeline <- ops <- passes <- backends <- top):\n" + "\n".join(bad)


def test_no_stray_top_level_module():
    stray = sorted(p.name for p in SOURCES["graphopt"].glob("*.py") if p.stem not in TOP_LEVEL_MODULES)
    assert not stray, f"modules directly in graphopt/ belong in a layer's sub-package: {stray}"


@pytest.mark.parametrize(
    "importer, source, expected",
    [
        ("graphopt.ir.flops", "from graphopt.ops.varlen import varlen_attention", "graphopt.ir.flops:1 imports graphopt.ops.varlen (ir -> ops)"),
        ("graphopt.ir.flops", "def f():\n    from ..pipeline import manager", "graphopt.ir.flops:2 imports graphopt.pipeline.manager (ir -> pipeline)"),
        (
            "graphopt.ops.norms",
            "import importlib\nimportlib.import_module('graphopt.backends.partition')",
            "graphopt.ops.norms:2 imports graphopt.backends.partition (ops -> backends)",
        ),
        ("graphopt.passes.canonicalize", "from graphopt import optimize", "graphopt.passes.canonicalize:1 imports graphopt (passes -> top)"),
    ],
)
def test_the_walk_catches_each_import_form(tmp_path, monkeypatch, importer, source, expected):
    # the walk run on a stand-in source for one module
    path = tmp_path / "module.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, importer, path)
    bad = [b for b in upward_imports() if b.startswith(importer + ":")]
    assert bad == [expected]
