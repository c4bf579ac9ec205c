"""The layers import one way: exporter may use converters, converters never use exporter."""

from __future__ import annotations

import ast

from tests.conftest import REPO


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names, at any depth (inside functions too), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_the_finder_sees_nested_imports():
    source = "def f():\n    if True:\n        from exporter.errors import InputError\n    import exporter\n"
    assert sorted(imported_modules(ast.parse(source))) == [(3, "exporter.errors"), (4, "exporter")]


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


# exporter/'s layers, lowest first: a module imports only from its own layer or the ones below it.
LAYERS = {
    "library": 0,  # exporter/*.py and exporter/merge/: the work itself
    "engine": 1,  # run.py, graph.py, graph_ray.py: the run object and the executors
    "stages": 2,  # exporter/stages/
    "commands": 3,  # exporter/commands/
    "cli": 4,  # cli.py, cli_options.py, cli_render.py, __main__.py
}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[:2] in (["exporter", "run"], ["exporter", "graph"], ["exporter", "graph_ray"]):
        return LAYERS["engine"]
    if parts[:2] == ["exporter", "stages"]:
        return LAYERS["stages"]
    if parts[:2] == ["exporter", "commands"]:
        return LAYERS["commands"]
    if len(parts) > 1 and (parts[1].startswith("cli") or parts[1] == "__main__"):
        return LAYERS["cli"]
    return LAYERS["library"]


def test_exporter_imports_go_down_the_layers():
    """Following the options from the command line goes down the layers and never back up to a hub."""
    offending = []
    for path in sorted((REPO / "exporter").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for line, imported in imported_modules(ast.parse(path.read_text(), filename=str(path))):
            if imported.startswith("exporter.") and layer(imported) > layer(module):
                offending.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert offending == [], "a lower layer imports a higher one:\n" + "\n".join(offending)


def test_the_layer_rule_bites():
    assert layer("exporter.stages.merge") > layer("exporter.merge")
    assert layer("exporter.cli") > layer("exporter.commands.check") > layer("exporter.run")


def test_commands_are_peers():
    """No command is stacked on another: runtime-lora's merged comparison is its own branch module, and a
    batch builds the graphs of merge-quantize and runtime-lora (their graph builders, not the commands)."""
    allowed = {
        ("exporter.commands.runtime_lora", "exporter.commands.compare_merged"),
        ("exporter.commands.batch", "exporter.commands.batch_graph"),
        ("exporter.commands.batch", "exporter.commands.merge_quantize"),
        ("exporter.commands.batch", "exporter.commands.runtime_lora"),
        ("exporter.commands.batch_graph", "exporter.commands.merge_quantize"),
        ("exporter.commands.batch_graph", "exporter.commands.runtime_lora"),
    }
    stacked = []
    for path in sorted((REPO / "exporter" / "commands").glob("*.py")):
        module = f"exporter.commands.{path.stem}"
        for line, imported in imported_modules(ast.parse(path.read_text(), filename=str(path))):
            if imported.startswith("exporter.commands.") and (module, imported) not in allowed:
                stacked.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert stacked == []
