"""`edge-export merge-quantize`: the graph of one merged export (exporter.graphs.export_graph), run."""

from __future__ import annotations

from exporter.engine.command import run_command
from exporter.engine.run import Reporter, silent
from exporter.graphs.export import prepare_export
from exporter.graphs.export_graph import export_graph
from exporter.graphs.export_manifest import ExportResult
from exporter.inputs.options import ExportOptions

__all__ = ["ExportResult", "merge_quantize"]


def merge_quantize(options: ExportOptions, report: Reporter = silent) -> ExportResult:
    """Merge → convert → quantize → Modelfiles → quality → manifest; on failure nothing this run wrote
    stays. The output folder is locked for the whole run: a second run on it waits or fails clearly."""
    return run_command(prepare_export(options), export_graph, report)
