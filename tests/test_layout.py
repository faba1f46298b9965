"""The import layering of src/minitron, read from the code's own imports (module level and inside functions; those
under `if TYPE_CHECKING:` are not imports at run time): no module imports from a layer above its own, and no
import cycle runs between modules. LAYERS is the one place the order is declared, top to bottom:
CLI -> pipeline -> stages -> eval -> data -> architecture facts. A module imports from its own layer or below.

The root package's lazy public names (minitron/__init__.py) sit above everything; each package's __init__
re-exporting its own modules is no cycle.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "minitron"

LAYERS = [  # top to bottom: the packages (first component of a module's path under minitron) of each layer
    ("api", ["__init__"]),                     # minitron/__init__.py: the public names, imported lazily
    ("cli", ["cli"]),
    ("pipeline", ["pipeline"]),
    ("stages", ["prune", "distill", "export"]),
    ("eval", ["eval"]),
    ("data", ["data"]),
    ("arch", ["arch", "_api", "_moved"]),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The minitron modules `path` imports (`from minitron import arch` names the module arch)."""
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minitron":
            base = node.module.removeprefix("minitron").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in known else (base or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "minitron":
                    found.add(alias.name.removeprefix("minitron").lstrip(".") or "__init__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(SRC.rglob("*.py"))
    known = {module_name(p) for p in paths}
    out = {}
    for p in paths:
        me = module_name(p)
        # a package's own __init__ re-exporting its modules is not a cycle with them
        out[me] = {m for m in imports_of(p, known) if m != me and not (m.startswith(me + ".") and p.name == "__init__.py")
                   and m != "__init__"}
    return out


def layer_of() -> dict[str, int]:
    """Every module -> the index of its layer in LAYERS (by its package)."""
    packages = {pkg: i for i, (_, pkgs) in enumerate(LAYERS) for pkg in pkgs}
    return {m: packages[m.split(".")[0]] for m in graph() if m.split(".")[0] in packages}


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(layer_of()))
    assert not missing, f"declare the layer of {missing} in tests/test_layers.py LAYERS"


def test_no_import_from_a_higher_layer():
    g, layer = graph(), layer_of()
    upward = sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps if layer[b] < layer[a])
    assert not upward, "imports from a higher layer: " + ", ".join(upward)


def _cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_public_api_is_callable_and_packages_stay_reachable(monkeypatch):
    """`from minitron import prune, distill, evaluate, run` and the config dataclasses: the four are called as
    functions, while the packages' modules (minitron.prune.plan, ...) stay where they are."""
    import minitron
    import minitron.prune.plan
    from minitron import DistillConfig, PruneConfig, RunConfig, Target, distill, evaluate, prune, run
    from minitron.eval.harness import evaluate as evaluate_fn
    from minitron.pipeline.stages import run as run_fn

    assert run is run_fn and minitron.prune.plan.Target is Target and prune.PruneConfig is PruneConfig
    assert distill.DistillConfig is DistillConfig and RunConfig.__module__ == "minitron.pipeline.recipe"
    monkeypatch.setattr(minitron.prune, "prune", lambda cfg: ("pruned", cfg))
    monkeypatch.setattr(minitron.distill, "distill", lambda cfg: ("distilled", cfg))
    assert prune("c") == ("pruned", "c") and distill("c") == ("distilled", "c")
    assert evaluate.__call_target__ == "evaluate" and evaluate.evaluate is evaluate_fn


def test_old_module_paths_warn_and_give_the_new_module():
    """Every flat module path of minitron 0.1.0 imports for one more release, with a FutureWarning naming the new
    path, as the very module object of the new path (its state and patches are shared)."""
    import importlib
    import sys

    import pytest

    from minitron._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(f"minitron.{old}", None)
        with pytest.warns(FutureWarning, match=f"import minitron.{new}"):
            mod = importlib.import_module(f"minitron.{old}")
        assert mod is importlib.import_module(f"minitron.{new}"), old
    from minitron.data import DataError, load_splits  # noqa: F401 (same-name packages re-export their old module)
    from minitron.pipeline import RunConfig, run  # noqa: F401
    from minitron.prune import PruneConfig, apply_plan, prune, slice_linear  # noqa: F401
