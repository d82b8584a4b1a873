"""The import direction of sidscale, read from its source: which module imports which.

The graph is built from the AST of every module under ``sidscale/`` (nothing is imported), with each
edge marked by where the import statement sits: ``module`` (runs when the module is imported: the
top level, class bodies, ``try`` / ``if`` blocks), ``function`` (inside a function: runs when it is
called) or ``typing`` (under ``if TYPE_CHECKING:``: never runs). The layering rules below are data;
each names the modules it constrains, what they may (or may not) import, and which edge kinds count.
A violation lists every offending edge as ``importer -> imported (kind, line)``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

KINDS = ("module", "function", "typing")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    kind: str  # one of KINDS
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.kind}, line {self.line})"


def module_names(root: Path, package: str = "sidscale") -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root/package`` (a package is its __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its kind (where it sits)."""
    found = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append((child, kind))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, "typing" if kind == "typing" else "function")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind)
            else:
                visit(child, kind)

    visit(tree, "module")
    return found


def _resolve(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: set[str]) -> list[str]:
    """The sidscale modules one import statement names: ``from P import n`` names the module P.n
    when there is one, else P (the name is defined in P)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if node.level:  # relative: from the importer's package, one level up per extra dot
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        package = ".".join(base + ([node.module] if node.module else []))
    else:
        package = node.module or ""
    out = []
    for a in node.names:
        sub = f"{package}.{a.name}"
        if sub in modules:
            out.append(sub)
        elif package in modules:
            out.append(package)
    return list(dict.fromkeys(out))


def import_graph(root: Path = REPO, package: str = "sidscale") -> list[Edge]:
    """Every import of one sidscale module by another, found in the source under ``root``."""
    files = module_names(root, package)
    names = set(files)
    edges = []
    for importer, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, kind in _imports(tree):
            for imported in _resolve(importer, path.name == "__init__.py", node, names):
                if imported != importer:
                    edges.append(Edge(importer, imported, kind, node.lineno))
    return edges


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Rule:
    """Modules under ``sources`` (minus ``exempt_sources``) may import only modules under
    ``allowed`` (when given) and none under ``forbidden``; ``allowed_edges``: (importer, imported)
    pairs accepted all the same. ``kinds``: the edge kinds the rule reads."""

    name: str
    sources: tuple[str, ...]
    allowed: tuple[str, ...] | None = None
    forbidden: tuple[str, ...] = ()
    exempt_sources: tuple[str, ...] = ()
    allowed_edges: tuple[tuple[str, str], ...] = ()
    kinds: tuple[str, ...] = KINDS
    why: str = ""

    def violations(self, edges: list[Edge]) -> list[Edge]:
        bad = []
        for e in edges:
            if e.kind not in self.kinds or not within(e.importer, self.sources):
                continue
            if within(e.importer, self.exempt_sources) or (e.importer, e.imported) in self.allowed_edges:
                continue
            if (self.allowed is not None and not within(e.imported, self.allowed)) or within(e.imported,
                                                                                            self.forbidden):
                bad.append(e)
        return bad


LEAF = ("sidscale.core", "sidscale.errors")
TOOLING = ("sidscale.testing", "sidscale.bench")
# The modules with a fault injection point (the trainer's step, a checkpoint's save, the export and the
# toy evaluation): the robustness tests reach every such point through SIDSCALE_FAULT.
FAULT_POINT_MODULES = ("sidscale.trainer", "sidscale.checkpointing.manager", "sidscale.outputs",
                       "sidscale.families.toy.evaluation")
RULES = (
    Rule("leaf_imports_nothing_else", sources=LEAF, allowed=LEAF,
         why="the leaf layer (errors, conditioning type, schedules, noise, io, precision) is what every "
             "other layer builds on; it imports nothing else from sidscale"),
    Rule("method_imports_only_leaf", sources=("sidscale.method",), allowed=(*LEAF, "sidscale.method"),
         why="the method (losses, guidance, guards) works on prediction functions and tensors; it does "
             "not know models, families, config or the trainer"),
    Rule("families_never_import_config", sources=("sidscale.families",), forbidden=("sidscale.config",),
         why="a family declares its options and checks (its spec); config asks the family, not the reverse"),
    Rule("product_never_imports_tooling", sources=("sidscale",), exempt_sources=TOOLING, forbidden=TOOLING,
         allowed_edges=tuple((m, "sidscale.testing.fault_injection") for m in FAULT_POINT_MODULES),
         why="bench and test helpers are tooling around the product; only the modules that hold a fault "
             "injection point (SIDSCALE_FAULT, a no-op unless set) import its reader"),
)


def module_cycles(edges: list[Edge], kinds: tuple[str, ...] = ("module",)) -> list[list[str]]:
    """The strongly connected components (more than one module) of the graph of ``kinds`` edges."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.kind in kinds:
            graph.setdefault(e.importer, set()).add(e.imported)
            graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def connect(v: str) -> None:  # Tarjan; the graph is ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def cycle_report(edges: list[Edge], cycles: list[list[str]], kinds: tuple[str, ...] = ("module",)) -> str:
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append("cycle among " + ", ".join(comp) + ":")
        lines += [f"  {e}" for e in edges if e.kind in kinds and e.importer in members and e.imported in members]
    return "\n".join(lines)


# The checks that fail before the redesign (issue 24) is merged; strict, so the merge that fixes one
# must take it out of this set.
FAILING_BEFORE_REDESIGN: set[str] = set()  # rules still broken (strict xfail); empty since the redesign


def _param(name: str, value: object):
    xfail = pytest.mark.xfail(strict=True, reason="fixed by the redesign merge")
    return pytest.param(value, id=name, marks=[xfail] if name in FAILING_BEFORE_REDESIGN else [])


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_graph()


@pytest.mark.parametrize("rule", [_param(r.name, r) for r in RULES])
def test_layering_rule(rule: Rule, edges: list[Edge]):
    bad = rule.violations(edges)
    assert not bad, f"{rule.name}: {rule.why}. Offending imports:\n" + "\n".join(f"  {e}" for e in bad)


# Module-level cycles break imports (a half-initialised module); cycles closed by a function-level
# import work, but the two modules are one unit that cannot be read or moved apart.
@pytest.mark.parametrize("kinds", [_param("no_module_cycles", ("module",)),
                                   _param("no_cycles_through_function_imports", ("module", "function"))])
def test_no_import_cycles(kinds: tuple[str, ...], edges: list[Edge]):
    cycles = module_cycles(edges, kinds)
    report = cycle_report(edges, cycles, kinds)
    assert not cycles, f"import cycles through {' and '.join(kinds)}-level imports:\n{report}"


def test_the_graph_sees_what_the_source_imports(edges: list[Edge]):
    """The graph against imports written out here: module-level, in a function, and a package's
    ``from P import name`` (the name defined in P, not a submodule)."""
    by = {(e.importer, e.imported): e.kind for e in edges}
    assert by[("sidscale.trainer", "sidscale.testing.fault_injection")] == "module"  # from sidscale.testing import m
    assert by[("sidscale.perf.preset_costs", "sidscale.perf.measured_memory")] == "function"
    assert len(edges) > 200 and {e.kind for e in edges} >= {"module", "function"}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# A clean miniature of the layering: each rule and the cycle check pass on it.
CLEAN = {
    "sidscale/__init__.py": "",
    "sidscale/errors.py": "",
    "sidscale/core/__init__.py": "",
    "sidscale/core/noise.py": "from sidscale.errors import X\n",
    "sidscale/method/__init__.py": "",
    "sidscale/method/sid.py": "from sidscale.core import noise\nfrom . import guards\n",
    "sidscale/method/guards.py": "import sidscale.errors\n",
    "sidscale/families/__init__.py": "",
    "sidscale/families/sd3.py": "from sidscale.core.noise import draw\n",
    "sidscale/config.py": "from sidscale.families import sd3\n",
    "sidscale/trainer.py": "from sidscale.testing import fault_injection\nfrom sidscale import config\n",
    "sidscale/testing/__init__.py": "",
    "sidscale/testing/fault_injection.py": "",
    "sidscale/bench/__init__.py": "",
    "sidscale/bench/bench.py": "from sidscale import trainer\n",
}
# One planted violation per rule: (file, text appended, the edge the rule must report).
PLANTED = {
    "leaf_imports_nothing_else": ("sidscale/core/noise.py", "def f():\n    from sidscale.method import sid\n",
                                  "sidscale.core.noise -> sidscale.method.sid (function"),
    "method_imports_only_leaf": ("sidscale/method/sid.py", "from ..families import sd3\n",
                                 "sidscale.method.sid -> sidscale.families.sd3 (module"),
    "families_never_import_config": ("sidscale/families/sd3.py",
                                     "if TYPE_CHECKING:\n    from sidscale.config import Config\n",
                                     "sidscale.families.sd3 -> sidscale.config (typing"),
    "product_never_imports_tooling": ("sidscale/config.py", "import sidscale.bench.bench\n",
                                      "sidscale.config -> sidscale.bench.bench (module"),
}


def test_each_rule_passes_a_clean_tree_and_reports_a_planted_import(tmp_path: Path):
    _write(tmp_path / "clean", CLEAN)
    clean = import_graph(tmp_path / "clean")
    assert all(not r.violations(clean) for r in RULES) and not module_cycles(clean)
    assert {r.name for r in RULES} == set(PLANTED)
    for rule in RULES:
        file, text, want = PLANTED[rule.name]
        root = tmp_path / rule.name
        _write(root, dict(CLEAN, **{file: CLEAN[file] + text}))
        reported = [str(e) for e in rule.violations(import_graph(root))]
        assert len(reported) == 1 and reported[0].startswith(want), (rule.name, reported)


def test_a_planted_cycle_is_reported_and_a_function_level_one_is_not(tmp_path: Path):
    lazy = dict(CLEAN, **{"sidscale/core/noise.py": CLEAN["sidscale/core/noise.py"]
                          + "def f():\n    from sidscale.families import sd3\n"})
    _write(tmp_path / "lazy", lazy)
    assert not module_cycles(import_graph(tmp_path / "lazy"))
    eager = dict(CLEAN, **{"sidscale/core/noise.py": CLEAN["sidscale/core/noise.py"]
                           + "from sidscale.families import sd3\n"})
    _write(tmp_path / "eager", eager)
    edges = import_graph(tmp_path / "eager")
    assert module_cycles(edges) == [["sidscale.core.noise", "sidscale.families.sd3"]]
    assert "sidscale.families.sd3 -> sidscale.core.noise (module, line 1)" in cycle_report(edges, module_cycles(edges))
