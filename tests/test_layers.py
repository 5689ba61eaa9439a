"""The package's layering, read from its source with `ast`, and what `import offload_moe` and
`offload-moe --help` load in a fresh interpreter.

Every import statement counts: module level, inside functions, under `if TYPE_CHECKING:`, and
relative ones. A function-level import is still a dependency (it runs the first time the
function does), so it follows the layers too: deferring an import never excuses an upward one
or a cycle. The cli, the top layer, defers its heavy imports only to keep --help light.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "offload_moe"

# The layer order, lowest first: a module may import modules of its own layer or of lower ones.
# An entry names a module or a whole subpackage (its __init__ and everything under it); inside a
# layer, imports may go either way as long as they make no cycle. "offload_moe" alone is the
# package's __init__, the public facade (load, convert, the errors): above everything it
# re-exports, below the cli (which calls offload_moe.load so that tests can replace it).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("offload_moe.errors", "offload_moe.paths", "offload_moe.units", "offload_moe.stop_strings"),
    ("offload_moe.model",),
    ("offload_moe.quant",),
    ("offload_moe.checkpoint",),
    ("offload_moe.runtime",),
    ("offload_moe.planning",),
    ("offload_moe.options",),
    ("offload_moe.config",),
    ("offload_moe.loader",),
    ("offload_moe.conversion",),
    ("offload_moe.testing", "offload_moe.op_counter"),
    ("offload_moe.chat",),
    ("offload_moe.api",),
    ("offload_moe.demo",),
    ("offload_moe.server",),
    ("offload_moe",),
    ("offload_moe.cli",),
)

# What the research tools are: neither `import offload_moe` nor `offload-moe --help` loads them.
RESEARCH_MODULES = tuple(f"offload_moe.planning.{m}" for m in ("planner", "perfmodel", "replay", "paper_settings"))


# ---------------------------------------------------------------------------------------------
# The import graph


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """(imported offload_moe module, line) for every import statement anywhere in `source`.
    `from X import y` names the submodule X.y when there is one, X otherwise."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return sorted({(t, line) for t, line in found if _is_internal(t) and t != module}, key=lambda e: (e[1], e[0]))


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    modules = package_modules(root)
    known = set(modules)
    return {m: imports_of(m, path.read_text(), path.name == "__init__.py", known) for m, path in modules.items()}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest entry that is `module` or a package above it ("offload_moe"
    itself names only the package's __init__)."""
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            below = module.startswith(entry + ".") and entry != PACKAGE
            if (module == entry or below) and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def _layer_name(i: int) -> str:
    return " / ".join(e.removeprefix("offload_moe.") for e in LAYERS[i])


def strongly_connected(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_cycle(graph: dict[str, list[tuple[str, int]]], start: str, within: set[str]) -> list[tuple[str, str, int]]:
    """The shortest cycle through `start` inside `within`, as (importer, imported, line) edges."""
    came_from: dict[str, tuple[str, int]] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w, line in graph[v]:
            if w not in within or w in came_from:
                continue
            came_from[w] = (v, line)
            if w == start:
                edges, node = [], start
                while True:
                    prev, ln = came_from[node]
                    edges.append((prev, node, ln))
                    node = prev
                    if node == start:
                        return edges[::-1]
            queue.append(w)
    raise AssertionError(f"{start} is in no cycle inside {sorted(within)}")


def _where(module: str, line: int, modules: dict[str, Path]) -> str:
    return f"{modules[module].relative_to(ROOT)}:{line}"


def cycle_report(graph: dict[str, list[tuple[str, int]]], modules: dict[str, Path]) -> list[str]:
    lines = []
    for component in strongly_connected(graph):
        edges = shortest_cycle(graph, component[0], set(component))
        path = " -> ".join([edges[0][0]] + [f"{dst} ({_where(src, ln, modules)})" for src, dst, ln in edges])
        rest = sorted(set(component) - {src for src, _, _ in edges})
        lines.append(f"cycle: {path}" + (f"; in the same knot: {', '.join(rest)}" if rest else ""))
    return lines


def upward_report(graph: dict[str, list[tuple[str, int]]], modules: dict[str, Path]) -> list[str]:
    lines = []
    for module, edges in sorted(graph.items()):
        mine = layer_of(module)
        for target, line in edges:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                lines.append(f"{_where(module, line, modules)}: {module} (layer {_layer_name(mine)}) imports "
                             f"{target} (layer {_layer_name(theirs)}, higher)")
    return lines


@pytest.fixture(scope="module")
def graph():
    return import_graph()


@pytest.fixture(scope="module")
def modules():
    return package_modules()


def test_every_module_has_a_layer(modules):
    missing = [m for m in modules if layer_of(m) is None]
    assert not missing, f"not in tests/test_layers.py LAYERS: {missing}"


def test_internal_imports_name_existing_modules(graph, modules):
    stale = [f"{_where(m, line, modules)}: {m} imports {t}, which does not exist"
             for m, edges in sorted(graph.items()) for t, line in edges if t not in modules]
    assert not stale, "\n" + "\n".join(stale)


def test_no_import_cycles(graph, modules):
    cycles = cycle_report(graph, modules)
    assert not cycles, "\n" + "\n".join(cycles)


def test_no_upward_imports(graph, modules):
    upward = upward_report(graph, modules)
    assert not upward, "\n" + "\n".join(upward)


def test_the_walker_sees_every_kind_of_import():
    """Relative imports resolved; imports inside functions and under TYPE_CHECKING counted;
    `from package import submodule` names the submodule."""
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        import torch
        from . import formats
        from .matmul import expert_fields
        from ..errors import ConfigError
        if TYPE_CHECKING:
            from offload_moe.api import OffloadedModel
        def f():
            import offload_moe.runtime.cache as cache
            from offload_moe.planning import replay, DEFAULTS
    """)
    known = {"offload_moe", "offload_moe.quant", "offload_moe.quant.formats", "offload_moe.quant.matmul",
             "offload_moe.errors", "offload_moe.api", "offload_moe.runtime.cache", "offload_moe.planning",
             "offload_moe.planning.replay"}
    assert imports_of("offload_moe.quant.quantize", source, False, known) == [
        ("offload_moe.quant.formats", 4), ("offload_moe.quant.matmul", 5), ("offload_moe.errors", 6),
        ("offload_moe.api", 8), ("offload_moe.runtime.cache", 10),
        ("offload_moe.planning", 11), ("offload_moe.planning.replay", 11),
    ]
    # in a package's __init__, "." is the package itself
    in_init = imports_of("offload_moe.quant", "from .formats import FORMATS\n", True, known)
    assert in_init == [("offload_moe.quant.formats", 1)]
    graph = {"a": [("b", 1)], "b": [("c", 2)], "c": [("a", 3), ("d", 4)], "d": []}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, "a", {"a", "b", "c"}) == [("a", "b", 1), ("b", "c", 2), ("c", "a", 3)]
    assert layer_of("offload_moe.quant.formats") < layer_of("offload_moe.planning.replay") < layer_of("offload_moe.cli")
    assert layer_of("offload_moe") == len(LAYERS) - 2 and layer_of("offload_moe.errors") == 0
    assert layer_of("offload_moe.planner") is None  # not in the table: test_every_module_has_a_layer says so


# ---------------------------------------------------------------------------------------------
# What a fresh interpreter loads

# Runs offload_moe.api without the package's __init__: exactly what `load` needs.
_API_ONLY = """
import importlib.util, sys, types
spec = importlib.util.find_spec("offload_moe")
pkg = types.ModuleType("offload_moe")
pkg.__path__, pkg.__spec__, pkg.__file__ = list(spec.submodule_search_locations), spec, spec.origin
sys.modules["offload_moe"] = pkg
import offload_moe.api
"""

_CLI_HELP = """
import contextlib, io
from offload_moe.cli import main
for argv in (["--help"], ["plan", "--help"], ["chat", "--help"], ["convert", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
"""


def _fresh_env() -> dict[str, str]:
    """This tree's package first on the path, whatever is installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def run_fresh(code: str) -> tuple[set[str], list[str]]:
    """(sys.modules, the lines it printed) after running `code` in a fresh interpreter on this tree."""
    code += "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env=_fresh_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    *printed, modules = res.stdout.splitlines()
    return set(json.loads(modules)), printed


def loaded_modules(code: str) -> set[str]:
    return run_fresh(code)[0]


def _third_party(names: set[str]) -> set[str]:
    tops = {n.partition(".")[0] for n in names}
    return {t for t in tops if t != PACKAGE and t not in sys.stdlib_module_names and not t.startswith("__")}


@pytest.fixture(scope="module")
def load_needs():
    return loaded_modules(_API_ONLY)


LOOK_UP_LOAD = "import offload_moe\noffload_moe.load, offload_moe.OffloadedModel"


@pytest.mark.parametrize("code", ["import offload_moe", LOOK_UP_LOAD])
def test_import_offload_moe_loads_no_research_tools_and_nothing_load_does_not_need(code, load_needs):
    loaded = loaded_modules(code)
    research = sorted(m for m in loaded if m in RESEARCH_MODULES)
    # Beyond what offload_moe.api (load) needs, the facade may add only itself
    extra = loaded - load_needs - {"offload_moe"}
    extra_internal = sorted(m for m in extra if _is_internal(m))
    extra_third_party = sorted(_third_party(extra))
    assert not (research or extra_internal or extra_third_party), (
        f"{code!r} loads research tools {research}; beyond what offload_moe.api (load) needs, "
        f"package modules {extra_internal} and third-party packages {extra_third_party}")


def test_looking_up_load_does_not_import_transformers():
    """transformers (~2.5 s of start-up) is imported when load() runs, not when it is looked up:
    the flat package before the restructure did not import it either."""
    spy = """
import sys, traceback
class Spy:
    chain = []
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and not Spy.chain:
            Spy.chain = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "offload_moe" in f.filename]
sys.meta_path.insert(0, Spy())
import offload_moe
offload_moe.load, offload_moe.OffloadedModel
print(" <- ".join(reversed(Spy.chain)))
"""
    loaded, (chain,) = run_fresh(spy)
    chain = chain.replace(str(ROOT) + os.sep, "")
    imported = "transformers" in loaded
    assert not imported, f"import offload_moe; offload_moe.load imports transformers: at {chain}"


def test_the_facade_resolves_lazily_and_convert_stays_the_function():
    loaded_modules("""
import offload_moe, sys
assert not any(m.startswith("offload_moe.") and m != "offload_moe.errors" for m in sys.modules), sorted(sys.modules)
import offload_moe.conversion
from offload_moe import OffloadedModel, convert, load
assert convert is offload_moe.convert is sys.modules["offload_moe.conversion"].convert and callable(load)
assert {"load", "convert", "OffloadedModel"} <= set(dir(offload_moe))
""")


def test_cli_help_loads_no_speed_model_nor_transformers():
    loaded = loaded_modules(_CLI_HELP)
    heavy = sorted(m for m in loaded if m in RESEARCH_MODULES or m == "transformers")
    assert not heavy, f"offload-moe --help loads {heavy}"


def test_cli_help_runs_as_a_module():
    res = subprocess.run([sys.executable, "-m", "offload_moe.cli", "--help"], check=False, capture_output=True,
                         text=True, env=_fresh_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: offload-moe") and "plan" in res.stdout
