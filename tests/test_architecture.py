"""The layering of docs/architecture.md, checked: no import cycle in nbbn/, the float64
reference free of Numba, kernels that import only what computing needs, tools that do not import
each other. Module-level imports only: an import inside a function runs when it is called, which
is how commands load kernels, torch or MPI lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nbbn"
CORE = {"spec", "validate", "registry", "reference", "tolerances", "fold", "seeds", "output",
        "api", "layer", "_backends", "pool", "__init__"}
TOOLS = {"bench", "accuracy", "paper", "distributed"}
DEPRECATED = {"harness", "study"}  # one-release aliases of `python -m` entry points


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, everywhere: bool = False) -> set[str]:
    """nbbn modules imported at module level, or anywhere with ``everywhere`` (relative imports
    resolved; ``from . import x`` counts as importing ``pkg.x`` when that is a module)."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # An ``if __name__ == "__main__":`` block is an entry point (a deprecated alias calling the
    # CLI), not something the module needs: it is left out.
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If)
                                              and "__main__" in ast.unparse(n.test))]
    for node in (ast.walk(tree) if everywhere else tree.body):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nbbn")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nbbn"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    return out


def _exists(mod: str) -> bool:
    p = PKG.parent.joinpath(*mod.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


GRAPH = {_module(p): _imports(p) for p in PKG.rglob("*.py")}
#: Every import, lazy ones inside functions included: a cycle there is still two modules that
#: need each other's insides (round 2's distributed.py and distributed_bench.py).
FULL_GRAPH = {_module(p): _imports(p, everywhere=True) for p in PKG.rglob("*.py")}


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("graph", [GRAPH, FULL_GRAPH], ids=["module-level", "with-lazy"])
def test_no_import_cycle(graph):
    """Depth-first search with a colour per module; an edge into a module still on the stack
    closes a cycle. A package's __init__ importing its own submodules is the usual exception
    (``nbbn`` -> ``nbbn.api`` -> ``nbbn.registry`` is no cycle as long as they don't import
    ``nbbn`` back); the command-line aliases import ``nbbn.cli`` by design."""
    colour, stack, cycles = {}, [], []

    def visit(m):
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == m or n not in graph:
                continue
            if colour.get(n) == 1:
                # a package importing its own submodules is no cycle unless they import it back
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in colour:
                visit(n)
        stack.pop()
        colour[m] = 2

    for m in sorted(graph):
        if m not in colour:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_reference_never_imports_numba():
    tree = ast.parse((PKG / "reference.py").read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] == "numba"}


@pytest.mark.parametrize("path", ["cpu/kernels.py", "cuda/kernels.py", "cuda/reduce.py"])
def test_kernels_import_only_what_computing_needs(path):
    tree = ast.parse((PKG / path).read_text(encoding="utf-8"))
    # llvmlite: Numba's code generator, for the cpu kernels' float16 conversion intrinsics
    allowed = {"__future__", "math", "os", "types", "numpy", "numba", "llvmlite", "collections",
               "dataclasses"}
    own = {"nbbn.fold", "nbbn.cuda.reduce"}
    bad = []
    for n in tree.body:
        if isinstance(n, ast.Import):
            bad += [a.name for a in n.names if a.name.split(".")[0] not in allowed]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                target = ".".join(["nbbn", path.split("/")[0]][:3 - n.level]
                                  + ([n.module] if n.module else []))
                if target not in own:
                    bad.append(target)
            elif n.module.split(".")[0] not in allowed:
                bad.append(n.module)
    assert not bad, f"{path} imports {bad}"


def test_core_imports_no_backend_or_tool():
    bad = {m: sorted(i for i in imps if _top(i) not in CORE)
           for m, imps in GRAPH.items() if _top(m) in CORE}
    assert not {m: v for m, v in bad.items() if v}


def test_tools_do_not_import_each_other():
    allowed = {("accuracy", "distributed")}  # part (d) measures synchronized BN
    bad = []
    for m, imps in GRAPH.items():
        t = _top(m)
        if t not in TOOLS:
            continue
        for i in imps:
            u = _top(i)
            if u in TOOLS and u != t and (t, u) not in allowed:
                bad.append(f"{m} -> {i}")
    assert not bad, bad


def test_deprecated_aliases_hold_no_code():
    """The alias packages only forward to the CLI (so nothing grows back there)."""
    for name in DEPRECATED:
        for p in (PKG / name).glob("*.py"):
            assert len(p.read_text(encoding="utf-8").splitlines()) <= 8, p


def test_every_internal_import_resolves():
    """Lazy imports inside functions too: a renamed module must not leave one behind."""
    missing = sorted(f"{m} -> {i}" for m, imps in FULL_GRAPH.items() for i in imps
                     if not _exists(i))
    assert not missing, missing
