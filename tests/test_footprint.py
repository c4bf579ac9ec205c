"""What running a GGUF takes: the KV-cache figure computed from the GGUF's own header equals llama.cpp's own
report for the same context, and every report row gives memory and speed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from converters.footprint import gguf_footprint
from tests.conftest import DemoExport

# llama.cpp's load log (src/llama-kv-cache.cpp): "llama_kv_cache: size =   67.50 MiB (  3072 cells, …"
KV_LOG = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells")


def llama_cpp_kv(gguf: str, context: int) -> tuple[float, int]:
    script = (
        "import sys, llama_cpp\n"
        "llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), verbose=True, use_extra_bufts=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, gguf, str(context)], capture_output=True, text=True, check=True
    )
    found = KV_LOG.search(proc.stderr)
    assert found, proc.stderr[-2000:]
    return float(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("context", [3000, 8192])
def test_the_kv_cache_figure_is_llama_cpp_s_own(demo_export: DemoExport, context: int):
    gguf = demo_export.gguf("Q8_0")
    footprint = gguf_footprint(gguf, context)
    mib, cells = llama_cpp_kv(str(gguf), context)
    assert footprint.context == cells
    assert footprint.kv_bytes is not None and round(footprint.kv_bytes / 2**20, 2) == mib
    assert footprint.total_bytes == gguf.stat().st_size + footprint.kv_bytes


def test_every_report_row_gives_memory_and_speed(demo_export: DemoExport):
    report = demo_export.report
    for row in report["artifacts"]:
        footprint = row["footprint"]
        assert (
            footprint["context"] == 8192 and footprint["trained_context"] == 8192
        )  # trained 8k, capped at 8k
        assert footprint["weights_bytes"] == row["size_bytes"] and footprint["kv_bytes"] > 0
        assert row["metrics"]["eval_tokens_per_s"] > 0 and row["metrics"]["generate_tokens_per_s"] > 0
    markdown = (demo_export.out / "report.md").read_text()
    assert "| memory | prompt tok/s | gen tok/s |" in markdown
    assert re.search(r"\| [0-9.]+ MiB @ 8192 \| \d+ \| \d+ \|", markdown), markdown
