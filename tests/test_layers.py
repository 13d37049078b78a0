"""The folder tree is the layer diagram: imports inside llmopt only point down, and nothing forms a cycle.

Layers, bottom to top (a module may import its own package and any lower layer, never a higher one
or a sibling package of its own layer):

    core -> kernels -> nn -> calibration | solvers -> methods -> pipeline -> io -> cli, evaluate, ...

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``. An import inside a
function is only allowed for a dependency outside llmopt that is optional (transformers, gguf, ...);
llmopt's own modules are imported at the top of the file, where the layering is visible.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Optional, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "llmopt"

# (layer index, prefixes). Modules not listed here fail the test: a new top-level folder or module
# must be given its place in the diagram.
LAYERS: List[Tuple[int, Tuple[str, ...]]] = [
    (0, ("llmopt._version", "llmopt._compat", "llmopt.core")),
    (1, ("llmopt.kernels",)),
    (2, ("llmopt.nn",)),
    (3, ("llmopt.calibration", "llmopt.solvers")),
    (4, ("llmopt.methods",)),
    (5, ("llmopt.pipeline",)),
    (6, ("llmopt.io",)),
    # The top: the package's __init__ (the public surface) and the programs and helpers built on it.
    (7, ("llmopt", "llmopt.cli", "llmopt.evaluate", "llmopt.models", "llmopt.testing", "llmopt.demo",
         "llmopt.__main__")),
]
TOP = 7


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> Tuple[int, str]:
    """``(layer index, the prefix that placed it)``: the longest matching prefix wins."""
    best: Optional[Tuple[int, str]] = None
    for index, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py LAYERS")
    return best


def internal_imports(path: pathlib.Path, module: str, modules: Set[str]) -> List[Tuple[str, int, bool]]:
    """``[(imported llmopt module, line, inside a function)]`` of one file."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    in_function: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    found = []
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                names.append(candidate if candidate in modules else target)
            if node.level and not node.module:
                # `from . import sub` imports the package first (its __init__ runs): an edge to the
                # package too, so a submodule doing it inside a package whose __init__ imports that
                # submodule is a cycle.
                names.append(target)
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if not name.startswith("llmopt"):
                continue
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name != module:
                found.append((name, node.lineno, id(node) in in_function))
    return found


def import_graph(root: pathlib.Path = PACKAGE) -> Dict[str, List[Tuple[str, int, bool]]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {name: internal_imports(path, name, set(files)) for name, path in files.items()}


def violations(graph: Dict[str, List[Tuple[str, int, bool]]]) -> List[str]:
    """One line per import that breaks the layering."""
    problems: List[str] = []
    for module, edges in graph.items():
        own_layer, own_prefix = layer_of(module)
        for target, line, lazy in edges:
            target_layer, target_prefix = layer_of(target)
            where = f"{module}:{line} imports {target}"
            if lazy:
                problems.append(f"{where} inside a function (import llmopt modules at the top of the file)")
            if target_layer > own_layer:
                problems.append(f"{where}: upward ({own_prefix} is below {target_prefix})")
            elif target_layer == own_layer and target_prefix != own_prefix and own_layer < TOP:
                problems.append(f"{where}: sideways ({own_prefix} and {target_prefix} are siblings)")
    return list(dict.fromkeys(problems))  # one line per import statement, in order


def cycles(graph: Dict[str, List[Tuple[str, int, bool]]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_only_point_down():
    problems = violations(import_graph())
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


@pytest.mark.parametrize("source, expected", [
    ("from ..pipeline.api import compress_\n", "upward (llmopt.core is below llmopt.pipeline)"),
    ("def f():\n    from .formats import get_format\n", "inside a function"),
])
def test_a_deliberate_upward_import_is_caught(tmp_path, source, expected):
    """The check fails on a planted violation: a core module importing the pipeline, or a lazy import."""
    package = tmp_path / "llmopt"
    (package / "core").mkdir(parents=True)
    (package / "pipeline").mkdir()
    for rel in ("__init__.py", "core/__init__.py", "core/formats.py", "pipeline/__init__.py", "pipeline/api.py"):
        (package / rel).write_text("")
    (package / "core" / "packing.py").write_text(source)
    problems = violations(import_graph(package))
    assert any("llmopt.core.packing" in p and expected in p for p in problems), problems


def test_a_planted_cycle_is_found(tmp_path):
    package = tmp_path / "llmopt"
    (package / "nn").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nn" / "__init__.py").write_text("")
    (package / "nn" / "a.py").write_text("from .b import x\n")
    (package / "nn" / "b.py").write_text("from .a import y\n")
    assert cycles(import_graph(package)) == [["llmopt.nn.a", "llmopt.nn.b"]]


def test_from_dot_import_counts_as_importing_the_package(tmp_path):
    """``from . import b`` in a submodule imports the package, whose __init__ imports the submodule."""
    package = tmp_path / "llmopt"
    (package / "kernels").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "kernels" / "__init__.py").write_text("from . import a\n")
    (package / "kernels" / "a.py").write_text("from . import b\n")
    (package / "kernels" / "b.py").write_text("")
    assert cycles(import_graph(package)) == [["llmopt.kernels", "llmopt.kernels.a"]]
