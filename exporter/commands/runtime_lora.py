"""`edge-export runtime-lora`: the graph of one runtime-LoRA export (exporter.graphs.runtime_graph), run."""

from __future__ import annotations

from exporter.engine.command import run_command
from exporter.engine.run import Reporter, silent
from exporter.graphs.runtime import prepare_runtime
from exporter.graphs.runtime_graph import runtime_graph
from exporter.graphs.runtime_manifest import RuntimeLoraResult
from exporter.inputs.options import RuntimeLoraOptions

__all__ = ["RuntimeLoraResult", "runtime_lora"]


def runtime_lora(options: RuntimeLoraOptions, report: Reporter = silent) -> RuntimeLoraResult:
    """Quantize the unmerged base once per profile, convert every adapter, write Modelfiles, check each
    base + adapter pair against its unmerged reference, and write the manifest."""
    return run_command(prepare_runtime(options), runtime_graph, report)
