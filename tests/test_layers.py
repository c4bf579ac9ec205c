"""The packages are ordered (tests/layout.py's RANKS): imports go down the ranks, peers stay apart, no module
imports itself back through a cycle, and modules and functions stay small enough to read."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.layout import RANKS, Module, load_modules, package_of, parse_module

MAX_MODULE_LINES = 400
MAX_COMMAND_LINES = 300  # a command only builds a graph of stages
MAX_FUNCTION_LINES = 80
NOT_INSTALLED = ("demos", "tests", "bench", "vendor")  # top-level folders the installed package lacks


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to the deepest module of the tree it names."""

    source: str
    target: str
    line: int
    path: Path

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.source}) imports {self.target}"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (inside functions too), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def absolute_targets(module: Module, node: ast.ImportFrom) -> list[str]:
    """`from X import a, b` names X.a and X.b (which may be modules) and X; relative X resolved."""
    base = node.module or ""
    if node.level:
        anchor = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_edges(modules: dict[str, Module]) -> list[Import]:
    """Every import of every module, deferred ones included, resolved against the modules of the tree:
    `from exporter.merge import plan` names exporter.merge.plan, `from exporter.merge import PlanError`
    names exporter.merge. Imports of anything outside the tree (the standard library, torch) are left out,
    except the project's own top-level folders that are not installed."""
    edges = []
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base, *names = absolute_targets(module, node)
                named = [name for name in names if name in modules]
                if len(named) < len(names):  # a name defined in the base module itself
                    named.append(base)
            else:
                continue
            for name in named:
                target = resolved(name, modules)
                if target is not None and target != module.name:
                    edges.append(Import(module.name, target, node.lineno, module.path))
    return edges


def resolved(name: str, modules: dict[str, Module]) -> str | None:
    """The deepest module of the tree `name` is or lies in; a not-installed folder by its own name."""
    if name.split(".")[0] in NOT_INSTALLED:
        return name
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def rank_violations(edges: list[Import]) -> list[str]:
    """Imports that go up a rank, across to a peer of the same rank, or out to a folder never installed."""
    found = []
    for edge in edges:
        source, target = package_of(edge.source), package_of(edge.target)
        if source is None or source == target:
            continue
        if target is None:
            found.append(f"{edge}: {edge.target.split('.')[0]}/ is not part of the installed package")
        elif RANKS[target] > RANKS[source]:
            found.append(f"{edge}: {target} (rank {RANKS[target]}) is above {source} (rank {RANKS[source]})")
        elif RANKS[target] == RANKS[source]:
            found.append(
                f"{edge}: {target} and {source} are peers (rank {RANKS[source]}), which never import each other"
            )
    return found


def stacked_commands(edges: list[Import]) -> list[str]:
    """A command module importing another: commands are peers; what they share lives in a lower rank."""
    return [
        str(edge)
        for edge in edges
        if package_of(edge.source) == package_of(edge.target) == "exporter.commands"
    ]


def import_cycles(modules: dict[str, Module], edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {name: [] for name in modules}
    for edge in edges:
        if edge.target in graph:
            graph[edge.source].append(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph[successor])))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
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
                        cycles.append(sorted(component))
    return sorted(cycles)


def size_violations(modules: dict[str, Module]) -> list[str]:
    """Modules over their line limit and functions (methods, nested functions) over theirs."""
    found = []
    for module in modules.values():
        limit = MAX_COMMAND_LINES if package_of(module.name) == "exporter.commands" else MAX_MODULE_LINES
        if module.lines > limit:
            found.append(f"{module.path}: {module.lines} lines (at most {limit})")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(
                        f"{module.path}:{node.lineno} {node.name}(): {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    return found


def unranked_modules(modules: dict[str, Module]) -> list[str]:
    return [
        f"{module.path} ({module.name})" for module in modules.values() if package_of(module.name) is None
    ]


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return load_modules()


@pytest.fixture(scope="module")
def edges(tree: dict[str, Module]) -> list[Import]:
    return import_edges(tree)


def test_the_finder_sees_nested_imports():
    source = (
        "def f():\n    if True:\n        from exporter.core.errors import InputError\n    import exporter\n"
    )
    assert sorted(imported_modules(ast.parse(source))) == [(3, "exporter.core.errors"), (4, "exporter")]


def test_converters_never_import_exporter():
    files = sorted((REPO / "converters").glob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module == "exporter" or module.startswith("exporter.")
    ]
    assert offending == [], "converters/ is the layer below exporter/:\n" + "\n".join(offending)


def test_converters_have_no_relative_imports_that_could_reach_exporter():
    relative = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted((REPO / "converters").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 1
    ]
    assert relative == []


def test_imports_go_down_the_ranks(edges):
    """(a) A module imports its own package or a lower rank; packages of one rank never import each other."""
    found = rank_violations(edges)
    order = ", ".join(f"{package} {rank}" for package, rank in RANKS.items())
    assert found == [], f"imports against the ranks ({order}):\n" + "\n".join(found)


def test_no_command_imports_another(edges):
    """(b) Commands are peers: a graph builder two commands share belongs in exporter.graphs, below them."""
    found = stacked_commands(edges)
    assert found == [], "a command imports another command:\n" + "\n".join(found)


def test_no_import_cycles(tree, edges):
    """(c) No module reaches itself through imports, deferred ones included."""
    found = import_cycles(tree, edges)
    assert found == [], (
        "import cycles (break each by moving what both need into a lower module):\n"
        + "\n".join(" ⇄ ".join(cycle) for cycle in found)
    )


def test_modules_and_functions_are_small(tree):
    """(d) Modules ≤ 400 lines (commands ≤ 300), functions ≤ 80 lines."""
    found = size_violations(tree)
    assert found == [], "too long (split by concern):\n" + "\n".join(found)


def test_every_module_belongs_to_a_ranked_package(tree):
    """(e) A new package under exporter/ needs a rank in tests/layout.py's RANKS before it has modules."""
    found = unranked_modules(tree)
    assert found == [], "modules outside every ranked package (give the package a rank):\n" + "\n".join(found)


def test_every_package_directory_has_an_init(tree):
    folders = {path.parent for path in (REPO / "exporter").rglob("*.py")}
    missing = sorted(
        str(folder.relative_to(REPO)) for folder in folders if not (folder / "__init__.py").exists()
    )
    assert missing == [], "folders of modules without __init__.py:\n" + "\n".join(missing)


SYNTHETIC = {
    "exporter/__init__.py": "from exporter.core.version import __version__\n",
    "exporter/core/__init__.py": "",
    "exporter/core/version.py": "__version__ = '0'\n",
    "exporter/core/atomic.py": "def write():\n    from exporter.engine.run import Run\n",
    "exporter/merge/__init__.py": "from exporter.merge import plan\n",
    "exporter/merge/plan.py": "from exporter.deploy.modelfile import spec\nfrom exporter.merge import Updates\n",
    "exporter/merge/write.py": "from .plan import Plan\nfrom . import updates, Writer\n",
    "exporter/merge/updates.py": "",
    "exporter/deploy/__init__.py": "",
    "exporter/deploy/modelfile.py": "import demos.inputs\n",
    "exporter/engine/__init__.py": "",
    "exporter/engine/run.py": "",
    "exporter/stages/__init__.py": "",
    "exporter/stages/chat.py": "from exporter import __version__\n",
    "exporter/commands/__init__.py": "",
    "exporter/commands/batch.py": "from exporter.commands.merge_quantize import export_graph\n",
    "exporter/commands/merge_quantize.py": "def export_graph():\n" + "    x = 1\n" * 80,
    "exporter/helpers.py": "",
    "converters/__init__.py": "",
    "converters/quantize.py": "from exporter.core.errors import InputError\n",
}


def synthetic_tree() -> dict[str, Module]:
    modules = {}
    for path, source in SYNTHETIC.items():
        name = ".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = parse_module(name, Path(path), source)
    return modules


def test_the_rules_bite():
    """Each rule finds a violation planted in a small synthetic tree, and only where it was planted."""
    modules = synthetic_tree()
    edges = import_edges(modules)
    ranks = "\n".join(rank_violations(edges))
    assert "(exporter.core.atomic) imports exporter.engine.run: exporter.engine (rank 6) is above" in ranks
    assert (
        "(exporter.merge.plan) imports exporter.deploy.modelfile: exporter.deploy and exporter.merge are peers"
        in ranks
    )
    assert "(exporter.stages.chat) imports exporter:" in ranks  # the public API is the top
    assert (
        "(exporter.deploy.modelfile) imports demos.inputs: demos/ is not part of the installed package"
        in ranks
    )
    assert "(converters.quantize) imports exporter.core" in ranks
    assert "(exporter) imports" not in ranks and "(exporter.merge.write)" not in ranks
    assert stacked_commands(edges) == [
        "exporter/commands/batch.py:1 (exporter.commands.batch) imports exporter.commands.merge_quantize"
    ]
    assert {(edge.target, edge.line) for edge in edges if edge.source == "exporter.merge.write"} == {
        ("exporter.merge.plan", 1),
        ("exporter.merge.updates", 2),
        ("exporter.merge", 2),
    }
    assert import_cycles(modules, edges) == [["exporter.merge", "exporter.merge.plan"]]
    assert size_violations(modules) == [
        "exporter/commands/merge_quantize.py:1 export_graph(): 81 lines (at most 80)"
    ]
    assert unranked_modules(modules) == ["exporter/helpers.py (exporter.helpers)"]


def test_the_module_limits_bite():
    long_command = parse_module("exporter.commands.x", Path("exporter/commands/x.py"), "x = 1\n" * 301)
    long_stage = parse_module("exporter.stages.x", Path("exporter/stages/x.py"), "x = 1\n" * 301)
    assert size_violations({"exporter.commands.x": long_command, "exporter.stages.x": long_stage}) == [
        "exporter/commands/x.py: 301 lines (at most 300)"
    ]
