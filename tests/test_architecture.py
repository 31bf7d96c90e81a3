"""The package's shape, enforced: no import circle inside `methodlab`, the layers' "never"
directions, and no method named in the generic execution code.

Imports are read with `ast`, including those inside functions (a lazy import is still a
dependency). An edge goes to the module named; `from pkg import name` goes to `pkg.name` when
that is a module, else to `pkg`. Parent packages are not edges: a package's `__init__` importing
its own modules (the registries' pattern) is not a circle. A package that imports all its
modules with `registry.import_submodules` has an edge to each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from methodlab.registry import method_names

SOURCE = Path(__file__).resolve().parents[1] / "platform"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SOURCE / "methodlab").rglob("*.py"):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        if (isinstance(node, ast.Call) and path.name == "__init__.py"
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_submodules"):
            found.update(m for m in MODULES if m.rpartition(".")[0] == name)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    # So that the next test cannot pass by finding nothing.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_methodlab():
    assert len(GRAPH) > 30 and GRAPH["methodlab.methods"], "the import graph was not read"
    assert _cycles(GRAPH) == []


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


EXECUTION = ("methodlab.train", "methodlab.sweep", "methodlab.cli", "methodlab.demo", "methodlab.report",
             "methodlab.tracking")
NEVER = [
    # (modules, must not import)
    (("methodlab.registry",), ("methodlab.data", "methodlab.models", "methodlab.methods", "methodlab.config")),
    (("methodlab.models",), ("methodlab.methods", *EXECUTION)),
    (("methodlab.data",), ("methodlab.methods", "methodlab.models", *EXECUTION)),
    (("methodlab.metrics", "methodlab.losses"), ("methodlab.methods", *EXECUTION)),
    (("methodlab.config",), ("methodlab.methods", "methodlab.models", "methodlab.data", *EXECUTION)),
    (("methodlab.methods",), EXECUTION),
]


@pytest.mark.parametrize("layer,forbidden", NEVER, ids=[layer[0] for layer, _ in NEVER])
def test_layers_never_import_upwards(layer, forbidden):
    # models.hub loads registered models from MLflow: it sits above the registries by design.
    wrong = {m: sorted(d for d in deps if _under(d, forbidden))
             for m, deps in GRAPH.items() if _under(m, layer) and m != "methodlab.models.hub"}
    assert {m: d for m, d in wrong.items() if d} == {}


GENERIC = ["train/core.py", "train/loop.py", "train/launch.py", "train/faults.py", "sweep.py", "tracking.py",
           "demo.py"]


def _code_words(path: Path) -> set[str]:
    """Names and string literals of the code, without comments and docstrings (their examples
    may name a method)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    words |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words |= set(_words(node.value))
    return words


def _words(text: str) -> list[str]:
    out, word = [], []
    for ch in text + " ":
        if ch.isalnum() or ch == "_":
            word.append(ch)
        elif word:
            out.append("".join(word))
            word = []
    return out


@pytest.mark.parametrize("relative", GENERIC)
def test_generic_code_names_no_method(relative):
    named = sorted(_code_words(SOURCE / "methodlab" / relative) & set(method_names()))
    assert named == [], f"{relative} names {named}: ask the method (a class attribute or hook) instead"


def test_a_method_name_in_code_is_found(tmp_path):
    # What the check above reads: a literal or a name in code counts, a docstring does not.
    probe = tmp_path / "probe.py"
    probe.write_text('"""Run `methodlab train toast`."""\nORDER = ["supervised"]\nx = d3gzsl\n')
    assert _code_words(probe) & set(method_names()) == {"supervised", "d3gzsl"}
