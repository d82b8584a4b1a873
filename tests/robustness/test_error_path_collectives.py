"""No collective runs on an error path: none is reachable from a ``finally`` or ``except`` block.

On the error path of one rank (a CUDA OOM in a preview, a bug, a signal raised as KeyboardInterrupt)
the other ranks are not at the same point: a collective there waits for peers that never come, or
pairs with a different collective of theirs, and turns a fast failure into a hang of up to
``dist.timeout_s`` (the review's finding: the ZeRO-3 EMA swap re-gathered its persistent parameters
in a ``finally``). The failing rank must do local work only and leave (``runtime.fail_fast``).

What the check covers (an approximation, by name, over ``sidscale/``):
- direct calls of torch.distributed / deepspeed.comm collectives (however imported);
- calls of ``sidscale.distributed.comm`` functions that are collectives (found from comm.py itself);
- DeepSpeed calls that gather or reduce across ranks: ZeRO-3's ``all_gather`` / ``all_gather_coalesced``
  of parameters, ``GatheredParameters``, an engine's ``save_checkpoint`` / ``load_checkpoint`` and
  ``backward`` / ``step`` (called on a name ending in ``engine``);
- calls of any function or method defined in ``sidscale/`` that (transitively, matched by name) makes
  one of the calls above; a call is followed when it is a bare name, a method of ``self`` / ``cls`` or
  of one of ``self``'s attributes, or a function of a module imported from sidscale (not
  ``subprocess.run``, ``stream.flush``).
Calls inside ``finally:`` bodies and ``except`` handlers count, nested statements included. Not covered:
calls through variables holding functions, ``with`` exits of third-party context managers, and
collectives inside third-party code other than the DeepSpeed calls named above.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.robustness.test_robust import COLLECTIVES, DIST_MODULES, _dotted

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED_GATHERS = {"all_gather", "all_gather_coalesced", "GatheredParameters", "save_checkpoint", "load_checkpoint"}
ENGINE_COLLECTIVES = {"backward", "step"}


def _call_name(call: ast.Call) -> tuple[str | None, str | None]:
    """(the called name, the dotted name of what it is called on, if any)."""
    f = call.func
    if isinstance(f, ast.Name):
        return f.id, None
    if isinstance(f, ast.Attribute):
        return f.attr, _dotted(f.value)
    return None, None


def _dist_aliases(tree: ast.AST) -> set[str]:
    aliases = set(DIST_MODULES) | {"dist"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in DIST_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in DIST_MODULES}
    return aliases


def _is_primitive(call: ast.Call, aliases: set[str], comm_functions: set[str]) -> str | None:
    name, owner = _call_name(call)
    if name is None:
        return None
    if owner in aliases and name in COLLECTIVES:
        return f"{owner}.{name}"
    if owner is not None and owner.split(".")[-1] == "comm" and name in comm_functions:
        return f"comm.{name}"
    if name in DEEPSPEED_GATHERS:
        return f"{owner or ''}.{name}".lstrip(".")
    if name in ENGINE_COLLECTIVES and owner is not None and owner.lower().endswith("engine"):
        return f"{owner}.{name}"
    return None


def _sidscale_names(tree: ast.AST) -> set[str]:
    """Names a module imports from sidscale (modules or functions): calls through them are followed."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sidscale":
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.split(".")[0] == "sidscale"}
    return names


def _followed(owner: str | None, local: set[str]) -> bool:
    """Whether a call on ``owner`` may be one of sidscale's own functions: a bare name, a method of
    ``self`` / ``cls`` or of one of ``self``'s attributes, or a function of a sidscale module."""
    if owner is None or owner in ("self", "cls"):
        return True
    parts = owner.split(".")
    return (parts[0] == "self" and len(parts) == 2) or parts[0] in local


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def comm_collectives(comm_source: str) -> set[str]:
    """The functions of comm.py that are collectives: they call a torch.distributed collective, or
    another such function of comm.py."""
    tree = ast.parse(comm_source)
    aliases = _dist_aliases(tree)
    found: set[str] = set()
    while True:
        more = {f.name for f in _functions(tree) if f.name not in found and any(
            isinstance(c, ast.Call) and (
                (_call_name(c)[1] in aliases and _call_name(c)[0] in COLLECTIVES)
                or (_call_name(c)[1] is None and _call_name(c)[0] in found))
            for c in ast.walk(f))}
        if not more:
            return found
        found |= more


def collective_functions(trees: dict[str, ast.AST], comm_functions: set[str]) -> dict[str, str]:
    """Names of the functions defined in ``trees`` that reach a collective: name -> what they reach."""
    reach: dict[str, str] = {}
    defs = [(f, _dist_aliases(t), _sidscale_names(t)) for t in trees.values() for f in _functions(t)]
    while True:
        changed = False
        for f, aliases, local in defs:
            if f.name in reach:
                continue
            for c in ast.walk(f):
                if not isinstance(c, ast.Call):
                    continue
                hit = _is_primitive(c, aliases, comm_functions)
                name, owner = _call_name(c)
                if hit is None and name in reach and name != f.name and _followed(owner, local):
                    hit = f"{name} -> {reach[name]}"
                if hit is not None:
                    reach[f.name] = hit
                    changed = True
                    break
        if not changed:
            return reach


def _error_path_statements(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Try | ast.TryStar):
            for stmt in node.finalbody:
                yield "finally", stmt
            for handler in node.handlers:
                for stmt in handler.body:
                    yield "except", stmt


def error_path_collectives(sources: dict[str, str], comm_source: str) -> list[str]:
    trees = {name: ast.parse(src) for name, src in sources.items()}
    comm_functions = comm_collectives(comm_source)
    reach = collective_functions(trees, comm_functions)
    hits = []
    for name, tree in trees.items():
        aliases, local = _dist_aliases(tree), _sidscale_names(tree)
        for where, stmt in _error_path_statements(tree):
            for c in ast.walk(stmt):
                if not isinstance(c, ast.Call):
                    continue
                hit = _is_primitive(c, aliases, comm_functions)
                called, owner = _call_name(c)
                if hit is None and called in reach and _followed(owner, local):
                    hit = f"{called} -> {reach[called]}"
                if hit is not None:
                    hits.append(f"{name}:{c.lineno}: in a {where} block: {hit}")
    return hits


def _sidscale_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "sidscale").rglob("*.py"))}


def test_comm_collectives_are_found_from_comm_py() -> None:
    found = comm_collectives((REPO / "sidscale" / "distributed" / "comm.py").read_text())
    assert {"all_reduce", "all_ranks_agree", "any_rank", "all_gather", "broadcast_object", "all_gather_object",
            "barrier", "decide_on_rank0", "gather_to_rank0", "broadcast_object_after_long_work"} <= found
    assert not found & {"rank", "world_size", "is_distributed", "comm_device", "device_for_backend"}


def test_the_checker_finds_collectives_on_error_paths() -> None:
    """Each kind the module docstring lists, in a finally and in an except; none on the normal path."""
    comm_src = "import torch.distributed as dist\ndef barrier():\n    dist.barrier()\ndef agree(x):\n    barrier()\n"
    src = "\n".join([
        "import torch.distributed as td",
        "from sidscale.distributed import comm",
        "def helper():",
        "    comm.agree(1)",
        "def outer():",
        "    helper()",
        "def f(engine, opt):",
        "    comm.barrier()",                     # normal path: fine
        "    try:",
        "        helper()",                       # normal path: fine
        "    finally:",
        "        td.all_reduce(x)",               # direct
        "        comm.agree(1)",                  # comm function (transitive inside comm.py)
        "        opt.persistent_parameters[0].all_gather(opt.persistent_parameters)",  # DeepSpeed
        "        if x:",
        "            outer()",                    # transitive, nested statement
        "    try:",
        "        pass",
        "    except Exception:",
        "        self.fake_engine.step()",        # engine collective
        "        print('local work only')",
        "        step()",                         # not called on an engine: not counted
    ])
    hits = error_path_collectives({"m.py": src}, comm_src)
    assert [h.split(": ", 1)[0] for h in hits] == ["m.py:12", "m.py:13", "m.py:14", "m.py:16", "m.py:20"], hits
    assert "outer -> helper -> comm.agree" in hits[3]


def test_no_collective_is_reachable_from_a_finally_or_except_block() -> None:
    sources = _sidscale_sources()
    assert len(sources) > 30
    hits = error_path_collectives(sources, sources["sidscale/distributed/comm.py"])
    assert not hits, ("collectives on an error path (another rank is not at the same point: do local work "
                      "only there, and the collective on the normal exit):\n" + "\n".join(hits))
