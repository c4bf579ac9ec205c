"""README's Layout section is rendered from the tree (tests/layout.py), and every module says what it is."""

from __future__ import annotations

import ast

from tests.conftest import REPO
from tests.layout import README, first_sentence, load_modules, readme_block, render_layout

DOCUMENTED = (
    "converters/**/*.py",
    "quant_profiles/*.py",
    "exporter/**/*.py",
    "demos/*.py",
    "bench/*.py",
    "vendor/*.py",
)


def test_readme_layout_is_what_the_tree_renders():
    rendered = render_layout(load_modules())
    assert readme_block(README.read_text()) == rendered, (
        "README.md's Layout block differs from the tree: run `python -m tests.layout --write` to update README"
    )


def test_every_module_has_a_docstring():
    missing = [
        str(path.relative_to(REPO))
        for pattern in DOCUMENTED
        for path in sorted(REPO.glob(pattern))
        if not ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert missing == [], "modules without a docstring (one line saying what the module is):\n" + "\n".join(
        missing
    )


def test_first_sentence_joins_lines_and_stops_at_the_end_of_the_sentence():
    docstring = "Write the merged folder: every\ntensor streamed. Then the config.\n\nMore detail."
    assert first_sentence(docstring) == "Write the merged folder: every tensor streamed."
    assert first_sentence("read_gguf_header (see converters.gguf_header) for x") == (
        "read_gguf_header (see converters.gguf_header) for x"
    )
    assert first_sentence(None) == ""
