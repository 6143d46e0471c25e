"""The packages' shape: no import cycles (function-local imports included), ``neuraldb_kernels`` independent of
``neuraldb`` and ``transformers``, and no module over 400 lines without its docstring saying why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"neuraldb": ROOT / "python" / "neuraldb", "neuraldb_kernels": ROOT / "neuraldb_kernels"}
MAX_LINES = 400
# Long modules whose docstrings do not say why yet; each is its owner's to split or explain. The list may only shrink.
KNOWN_LONG: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for name, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (a ``from a import b`` of a submodule ``a.b``
    counts as ``a.b``; of a name, as ``a``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


# Function-local imports that close a cycle, listed so that no new cycle can join them. The list may only shrink.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    for a, b in KNOWN_CYCLE_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: remove it from KNOWN_CYCLE_EDGES"
        graph[a].discard(b)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package's __init__ importing its own submodules is how packages work, not a cycle: edges from a module to a
    # package that contains it are left out.
    def edges(m: str) -> list[str]:
        return sorted(d for d in graph[m] if not m.startswith(d + "."))

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_kernels_import_nothing_of_neuraldb_or_transformers():
    for module, path in _modules().items():
        if not module.startswith("neuraldb_kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                top = name.split(".")[0]
                assert top not in ("neuraldb", "transformers"), f"{module} imports {name}"


def test_long_modules_say_why():
    long = []
    for module, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if f"over {MAX_LINES} lines" not in doc.lower() and module not in KNOWN_LONG:
                long.append(f"{module} ({text.count(chr(10))} lines)")
    assert not long, (
        f"modules over {MAX_LINES} lines whose docstring does not say why ('Over 400 lines because ...'): {long}"
    )


def test_every_public_name_of_the_package_resolves():
    import neuraldb

    assert sorted(neuraldb.__all__) == sorted(neuraldb._EXPORTS)
    for name in neuraldb.__all__:
        assert getattr(neuraldb, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        neuraldb.nope  # noqa: B018
