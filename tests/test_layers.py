"""Layer guards: the first-party import graph (parsed with ``ast``, imports inside functions included) points
down only, ``kernels -> groupvit -> train / bench``, and has no cycle; every fused op's public signature is its
reference's.

Layers, bottom up: ``kernels`` (the kernels, their eager spec and registry) knows nothing above it; ``groupvit``
(the model library) knows ``kernels`` only; ``train`` uses both; ``bench`` measures all three. Function-level imports of
first-party modules are kept for the modules that import triton (loaded lazily so that ``import groupvit`` works
where triton cannot): any other import inside a function hides an edge of the graph.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest

from groupvit import ops
from kernels.registry import OPS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "groupvit", "train", "bench", "tests")
LAYER = {"kernels": 0, "groupvit": 1, "train": 2, "bench": 3, "tests": 4}  # an import may not point to a higher one
LIBRARIES = ("kernels", "groupvit")  # here an import inside a function must have a reason (a lazy triton module)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "groupvit.ops"
    target: str  # first-party module it names, e.g. "kernels.registry" (a package stands for its __init__)
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[dict[str, ast.Module], list[Import]]:
    """Parse every module of ``packages`` under ``root``: ``({module: tree}, [first-party imports])``."""
    trees = {
        module_name(f, root): ast.parse(f.read_text(), str(f))
        for p in packages
        for f in sorted((root / p).rglob("*.py"))
    }

    def resolve(name: str) -> str | None:  # longest module prefix of a dotted name
        while name and name not in trees:
            name = name.rpartition(".")[0]
        return name or None

    found: list[Import] = []
    for mod, tree in trees.items():
        is_pkg = (root / Path(*mod.split(".")) / "__init__.py").is_file()
        package = mod if is_pkg else mod.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from the importing module's package
                        up = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(up + ([base] if base else []))
                    names = [f"{base}.{a.name}" for a in child.names]
                for n in names:
                    target = resolve(n)
                    imp = Import(mod, target, child.lineno, in_function) if target not in (None, mod) else None
                    if imp is not None and imp not in found:  # one entry per (module, line) for "from x import a, b"
                        found.append(imp)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return trees, found


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
        graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def upward(imports: list[Import]) -> list[Import]:
    return [i for i in imports if LAYER[i.target.split(".")[0]] > LAYER[i.source.split(".")[0]]]


def imports_triton(tree: ast.Module) -> bool:
    """Whether a module imports triton at module level (so first-party code may load it lazily)."""
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton":
            return True
    return False


def hidden(trees: dict[str, ast.Module], imports: list[Import]) -> list[Import]:
    """Function-level imports in the libraries of modules that could be imported at module level."""
    lazy = {m for m, t in trees.items() if imports_triton(t)}
    return [i for i in imports if i.in_function and i.source.split(".")[0] in LIBRARIES and i.target not in lazy]


def _show(found: list[Import]) -> str:
    return "\n".join(f"  {i.source}:{i.line} imports {i.target}" for i in found)


TREES, IMPORTS = scan(ROOT)


def test_import_graph_has_no_cycle():
    assert not cycles(IMPORTS), (
        "first-party import cycles (imports inside functions count): "
        f"{cycles(IMPORTS)}; move the shared code down into a module both can import"
    )


def test_imports_point_down_the_layers():
    bad = upward(IMPORTS)
    assert not bad, (
        "imports against the layers kernels -> groupvit -> train -> bench (a lower layer may not "
        f"know a higher one):\n{_show(bad)}"
    )


def test_library_imports_sit_at_module_level():
    bad = hidden(TREES, IMPORTS)
    assert not bad, (
        "first-party imports inside functions of kernels/ or groupvit/ (only modules that import triton "
        f"are loaded lazily); move them to the top of the module:\n{_show(bad)}"
    )


def _strings(tree: ast.Module) -> list[ast.Constant]:
    """String constants of a module except docstrings (f-string parts included)."""
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_kernels_name_nothing_above_them():
    """Dotted paths and user advice in kernels/ (error messages) do not name groupvit, train or bench APIs: a kernel
    says what to do in its own terms ("select the eager backend")."""
    words = ("groupvit.", "train.", "bench.", "set_backend", "set_attention", "ops.")
    bad = [
        f"  {m}:{s.lineno}: {s.value!r}"
        for m, t in TREES.items()
        if m.split(".")[0] == "kernels"
        for s in _strings(t)
        if any(w in s.value for w in words)
    ]
    assert not bad, "kernels/ strings naming an upper layer:\n" + "\n".join(bad)
    assert all(spec.triton is None or spec.triton.startswith("kernels.") for spec in OPS.values())


@pytest.mark.parametrize("name", sorted(OPS))
def test_fused_op_signatures_equal_their_reference(name):
    spec = OPS[name]
    want = inspect.signature(spec.reference)
    assert inspect.signature(getattr(ops, name)) == want, f"groupvit.ops.{name} differs from its reference"
    if spec.triton is not None:
        assert inspect.signature(spec.triton_fn()) == want, f"{spec.triton} differs from its reference"


def test_guards_find_planted_faults(tmp_path):
    """The scanner sees a cycle through a function-level import, an upward import and a hidden library import."""
    files = {
        "kernels/__init__.py": "",
        "kernels/a.py": "def f():\n    from groupvit import b\n",
        "kernels/fast.py": "import triton\n",
        "groupvit/__init__.py": "",
        "groupvit/b.py": "from kernels import a\n\ndef g():\n    import kernels.fast\n    from . import c\n",
        "groupvit/c.py": "",
        "train/__init__.py": "",
        "train/t.py": "import bench.x\n",
        "bench/__init__.py": "",
        "bench/x.py": "from train import t\n",
        "tests/__init__.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    trees, found = scan(tmp_path)
    assert cycles(found) == [["bench.x", "train.t"], ["groupvit.b", "kernels.a"]]
    assert {(i.source, i.target) for i in upward(found)} == {("kernels.a", "groupvit.b"), ("train.t", "bench.x")}
    assert sorted((i.source, i.target, i.line) for i in hidden(trees, found)) == [
        ("groupvit.b", "groupvit.c", 5),
        ("kernels.a", "groupvit.b", 2),
    ]
