"""No import loops in ``mora_jax``: the graph of its imports is read from the source with ``ast``
(fast, nothing is imported) and must have no cycle.

Module-level imports run when a module is first imported, so a cycle among them can leave a module
half-initialised: the whole package must have none. Imports inside functions run later, but a cycle
through them still ties modules together; the Hugging Face / PEFT I/O modules must have none of
either kind (``hf.files`` at the bottom, ``hf.peft_files`` and ``hf.peft`` above it,
``hf.checkpoints`` on top).

Each name has one home: a module's ``__all__`` lists only what it defines (a package's
``__init__`` may present its modules' names), and the project's own modules are imported at the top
of a module, never inside a function, except by the CLI (start-up time).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "mora_jax"
IO_MODULES = ("mora_jax.hf.checkpoints", "mora_jax.hf.files", "mora_jax.hf.peft", "mora_jax.hf.peft_files",
              "mora_jax.cli")
# Modules that may import the project's modules inside functions (start-up time of a command line).
DEFERRED_IMPORTS_ALLOWED = ("mora_jax.cli",)


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
    assert ("mora_jax.hf.peft", False) in IMPORTS["mora_jax.hf"]  # the package's face
    assert ("mora_jax.hf.files", False) in IMPORTS["mora_jax.hf.peft"]
    assert ("mora_jax.hf.checkpoints", True) in IMPORTS["mora_jax.cli"]  # imports inside functions are seen too


def test_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle_in_the_package():
    assert _cycles(_graph(include_deferred=False)) == []


def test_no_import_cycle_through_the_hf_and_peft_modules():
    through_io = [c for c in _cycles(_graph(include_deferred=True)) if set(c) & set(IO_MODULES)]
    assert through_io == []


def test_io_layering():
    """``hf.files`` imports no other ``mora_jax`` module; the PEFT modules never import ``hf.checkpoints``."""
    assert IMPORTS["mora_jax.hf.files"] == []
    for module in ("mora_jax.hf.peft", "mora_jax.hf.peft_files", "mora_jax.hf.files"):
        assert not {"mora_jax.hf", "mora_jax.hf.checkpoints"} & {t for t, _ in IMPORTS[module]}, module


def test_project_modules_are_imported_at_the_top():
    deferred = {m: sorted({t for t, d in edges if d}) for m, edges in IMPORTS.items()
                if m not in DEFERRED_IMPORTS_ALLOWED and any(d for _, d in edges)}
    assert deferred == {}


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _exported_names(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts]
    return []


def test_each_name_has_one_home():
    """No module (other than a package's face) exports a name it imports, and none says "re-exported"."""
    offenders = {}
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        source = path.read_text()
        tree = ast.parse(source)
        foreign = sorted(set(_exported_names(tree)) - _defined_names(tree))
        if foreign or "re-exported" in source:
            offenders[module] = foreign or ["a 're-exported' import"]
    assert offenders == {}


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
