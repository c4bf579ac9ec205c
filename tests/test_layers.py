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
