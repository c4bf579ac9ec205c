"""The packages of the tree in rank order, their modules, and the README's Layout block rendered from them.

    python -m tests.layout            # print the block
    python -m tests.layout --write    # replace the block between the layout markers in README.md

tests/test_layers.py checks the import rules against RANKS; tests/test_layout_doc.py checks that the
README block is what this renders now.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BEGIN = "<!-- layout:begin -->"
END = "<!-- layout:end -->"

# Every package, lowest rank first. A module imports only its own package or a lower rank; packages of
# one rank are peers and never import each other. quant_profiles/ (data and its schema) sits below
# converters/ (the quantizer reads a profile's llama.cpp type); neither imports exporter. `exporter` is
# the package's own __init__: the public API, at the top.
RANKS = {
    "quant_profiles": 0,
    "converters": 1,
    "exporter.core": 2,
    "exporter.inputs": 3,
    "exporter.merge": 4,
    "exporter.qlora": 4,
    "exporter.deploy": 4,
    "exporter.quality": 5,
    "exporter.engine": 6,
    "exporter.stages": 7,
    "exporter.graphs": 8,  # the commands' graph builders, between the stages and the commands
    "exporter.commands": 9,
    "exporter.cli": 10,  # with exporter/__main__.py
    "exporter": 11,
}
MEMBERS = {"exporter.__main__": "exporter.cli"}  # modules that belong to a package outside its folder
ROOTS = ("converters", "quant_profiles", "exporter")  # the folders whose modules RANKS orders


@dataclass(frozen=True)
class Module:
    """One .py file of the tree, parsed."""

    name: str  # dotted, a package's __init__ named as the package
    path: Path  # relative to the repository
    tree: ast.Module
    lines: int

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def parse_module(name: str, path: Path, source: str) -> Module:
    return Module(name, path, ast.parse(source, filename=str(path)), len(source.splitlines()))


def load_modules(repo: Path = REPO, roots: tuple[str, ...] = ROOTS) -> dict[str, Module]:
    """Every module under the roots, by dotted name."""
    modules = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            relative = path.relative_to(repo)
            name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            modules[name] = parse_module(name, relative, path.read_text())
    return modules


def package_of(module: str) -> str | None:
    """The ranked package a module belongs to, or None when it belongs to none."""
    if module in MEMBERS:
        return MEMBERS[module]
    if module in RANKS and module.count(".") <= 1:
        return module
    parts = module.split(".")
    if parts[0] in ROOTS and parts[0] != "exporter":
        return parts[0]
    if parts[0] == "exporter" and len(parts) > 1 and ".".join(parts[:2]) in RANKS:
        return ".".join(parts[:2])
    return None


def first_sentence(docstring: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    if not docstring:
        return ""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.search(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph)
    return paragraph[: match.start()] if match else paragraph


def package_order(modules: dict[str, Module]) -> list[str]:
    """The packages that exist, lowest rank first (peers in the order RANKS names them)."""
    present = {package_of(name) for name in modules}
    return [package for package in sorted(RANKS, key=RANKS.__getitem__) if package in present]


def render_layout(modules: dict[str, Module]) -> str:
    """The Layout block: each package (path and the first sentence of its docstring), then its modules."""
    lines = []
    for package in package_order(modules):
        folder = Path(*package.split("."))
        members = [name for name in modules if package_of(name) == package]
        members.sort(key=lambda name: (not modules[name].path.is_relative_to(folder), name))
        head = modules.get(package)
        lines.append(f"- `{folder.as_posix()}/` — {describe(head) if head else '(no __init__.py)'}")
        for name in members:
            if name != package:
                path = modules[name].path
                shown = path.relative_to(folder) if path.is_relative_to(folder) else path
                lines.append(f"  - `{shown.as_posix()}` — {describe(modules[name])}")
    return "\n".join(lines) + "\n"


def describe(module: Module) -> str:
    return first_sentence(ast.get_docstring(module.tree)) or "(no docstring)"


def readme_block(text: str) -> str:
    """What README.md holds between the layout markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def with_block(text: str, block: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update the Layout block of README.md")
    args = parser.parse_args(argv)
    block = render_layout(load_modules())
    if args.write:
        README.write_text(with_block(README.read_text(), block))
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
