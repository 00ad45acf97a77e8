"""No import loops in ``mora_jax``: the graph of its imports is read from the source with ``ast``
(fast, nothing is imported) and must have no cycle.

Module-level imports run when a module is first imported, so a cycle among them can leave a module
half-initialised: the whole package must have none. Imports inside functions run later, but a cycle
through them still ties modules together; the Hugging Face / PEFT I/O modules must have none of
either kind (``hf_format`` at the bottom, ``peft_format`` and ``peft`` above it, ``hf`` on top).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "mora_jax"
IO_MODULES = ("mora_jax.hf", "mora_jax.hf_format", "mora_jax.peft", "mora_jax.peft_format", "mora_jax.cli")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The innermost ``mora_jax`` module that importing ``name`` executes, or None (not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """``[(imported mora_jax module, deferred?)]``; deferred = inside a function body."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node, deferred: bool):
        for child in ast.iter_child_nodes(node):
            in_function = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((target, in_function) for a in child.names if (target := _resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}".strip(".")
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{alias.name}"
                    target = full if full in MODULES else _resolve(base)
                    if target:
                        found.append((target, in_function))
            visit(child, in_function)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return [(target, deferred) for target, deferred in found if target != module]


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _graph(include_deferred: bool) -> dict[str, set[str]]:
    return {m: {t for t, deferred in edges if include_deferred or not deferred} for m, edges in IMPORTS.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def test_graph_sees_the_io_modules_and_their_imports():
    for module in IO_MODULES:
        assert module in MODULES, module
    assert ("mora_jax.peft", False) in IMPORTS["mora_jax.hf"]
    assert ("mora_jax.hf_format", False) in IMPORTS["mora_jax.peft"]
    assert ("mora_jax.hf", True) in IMPORTS["mora_jax.cli"]  # imports inside functions are seen too


def test_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle_in_the_package():
    assert _cycles(_graph(include_deferred=False)) == []


def test_no_import_cycle_through_the_hf_and_peft_modules():
    through_io = [c for c in _cycles(_graph(include_deferred=True)) if set(c) & set(IO_MODULES)]
    assert through_io == []


def test_io_layering():
    """``hf_format`` imports no other ``mora_jax`` module; ``peft`` and ``peft_format`` never import ``hf``."""
    assert IMPORTS["mora_jax.hf_format"] == []
    for module in ("mora_jax.peft", "mora_jax.peft_format", "mora_jax.hf_format"):
        assert "mora_jax.hf" not in {t for t, _ in IMPORTS[module]}, module


def test_cli_imports_no_private_names():
    tree = ast.parse((PACKAGE_DIR / "cli.py").read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mora_jax")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
