"""The package is a strict top-down house: no import circle among the modules of dwdp_jax/ and models/, and no
arrow from a lower layer back up.

The graph is read from the source with `ast`, so it sees every import, not only those one import order runs.
Edges:
  - every `import` and `from ... import` of a package module, at module level or inside a function alike: an
    import deferred into a function is the usual way around a circle, so it does not hide one here;
  - importing `a.b.c` from outside package `a` runs `a/__init__.py` and `a/b/__init__.py` first, so those packages
    are edges too (the models' import of dwdp_jax.kernels runs dwdp_jax/__init__.py);
  - `from a import x` is an edge to module `a.x` when `x` is a module, to `a` otherwise.
Imports of anything outside the package (jax, torch, cupy, ...) are no edges: optional heavy dependencies may
stay inside the functions that need them.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dwdp_jax", "models")

# Bottom to top: a module of one layer imports only modules of its own layer or of the layers below. Modules in
# no layer (benchmarks, serving, simulator, ...) sit on top and are held only to the no-circle rule.
LAYERS = (
    ("dwdp_jax.kernels",),
    ("models",),
    ("dwdp_jax.placement", "dwdp_jax.prefetch", "dwdp_jax.packing", "dwdp_jax.memory", "dwdp_jax.expert_source",
     "dwdp_jax.transport", "dwdp_jax.checkpoint"),
    ("dwdp_jax.runtime",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules `name` imports directly, at any depth of its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    targets = set()
    for target in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            # An ancestor package of the importer is already running when the importer runs: no edge.
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                targets.add(prefix)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert {"dwdp_jax", "dwdp_jax.kernels.gpu", "models.deepseek_v3", "dwdp_jax.runtime.dwdp"} <= set(graph)
    assert "dwdp_jax.kernels.attention" in graph["models.deepseek_v3"]
    assert "dwdp_jax.checkpoint" in graph["dwdp_jax.runtime.dwdp"]


def test_no_import_circle():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        pytest.fail("import circle: " + " -> ".join(e.args[1]))


def layer_of(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    return None


def test_no_arrow_back_up():
    up = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
          for name, targets in sorted(import_graph().items()) for target in sorted(targets)
          if layer_of(name) is not None and layer_of(target) is not None and layer_of(target) > layer_of(name)]
    assert not up, "\n".join(up)


def test_package_init_has_no_lazy_attributes():
    """A module-level `__getattr__` in dwdp_jax/__init__.py is the lazy-import way around a circle: it hides imports
    from the graph above, so it is not allowed."""
    tree = ast.parse((ROOT / "dwdp_jax" / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]


def test_measurement_stays_out_of_the_product():
    """dwdp_jax.measure (benchmark and calibration code) is imported by experiments and tests only."""
    graph = import_graph()
    users = {name for name, deps in graph.items() if not name.startswith("dwdp_jax.measure")
             and any(d.startswith("dwdp_jax.measure") for d in deps)}
    assert "dwdp_jax.measure.gpu_bench" in graph and not users, users
