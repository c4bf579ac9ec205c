"""Render the architecture matrix's results (written by tests/test_arch_matrix.py) as the README's table.

    python -m tests.arch_matrix_table [RESULTS_JSON]

Prints a Markdown table in the order of tests/arch_matrix.py's ARCHITECTURES; a cell the tests have not
filled says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.arch_matrix import ARCHITECTURES, results_file


def merge_cell(merge: dict[str, Any] | None) -> str:
    if not merge:
        return "not run"
    return (
        f"✓ F16 KLD {merge['f16_mean_kld']:.1e}, Q8_0 {merge['q8_0_mean_kld']:.1e} "
        f"(base alone {merge['base_mean_kld']:.2f}); {merge['coverage']}"
    )


def runtime_cell(runtime: dict[str, Any] | None) -> str:
    if not runtime:
        return "not run"
    if not runtime["supported"]:
        return f"refused, exit 2 ({runtime['why']}): use merge-quantize"
    carried = f"; {runtime['coverage']}" if runtime.get("coverage") else ""
    return f"✓ F16 KLD {runtime['f16_mean_kld']:.1e}{carried}"


def render(results: dict[str, Any]) -> str:
    lines = [
        "| architecture | adapter trained (PEFT) | merge-quantize | runtime-lora | Modelfile (template family) |",
        "|---|---|---|---|---|",
    ]
    for architecture in ARCHITECTURES:
        row = results.get(architecture.name, {})
        merge = row.get("merge")
        modelfile = f"✓ ({merge['modelfile']})" if merge else "not run"
        lines.append(
            f"| {architecture.name} | {row.get('adapter', '')} | {merge_cell(merge)} | "
            f"{runtime_cell(row.get('runtime'))} | {modelfile} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else results_file()
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
