"""What every command that exports runs: prepare → open its run (the output folder's lock and checks) and
preflight → execute its stage graph → finish: the manifest, made from the stages' typed records.

merge-quantize and runtime-lora each run one export through `run_command`; a batch opens one run per
export with `open_command` and executes all their graphs as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from converters.vendor import VendoredLlamaCpp
from exporter.engine.graph import Results, StageGraph
from exporter.engine.run import Reporter, Run
from exporter.inputs.manifest import Manifest
from exporter.inputs.options import ExportingOptions, QualityOptions


class Prepared(Protocol):
    """An export read and checked before its run opens (its options, inputs and output layout)."""

    @property
    def options(self) -> ExportingOptions: ...

    @property
    def vendored(self) -> VendoredLlamaCpp: ...

    @property
    def finished_files(self) -> list[Path]:
        """What a finished export's run replaces with --force (the manifest, the reports)."""
        ...

    def check_output(self) -> None:
        """Refuse an output folder this export may not write into (called under its lock)."""

    def in_run(self, run: Run) -> Self:
        """The export in its open run."""
        ...

    def preflight(self, run: Run, report: Reporter) -> QualityOptions:
        """Every check before any work; the quality options it chose."""
        ...


R_co = TypeVar("R_co", covariant=True)
P = TypeVar("P", bound=Prepared)
R = TypeVar("R")


class CommandGraph(Protocol[R_co]):
    """A command's stage graph, and its finish from the graph's results."""

    @property
    def graph(self) -> StageGraph: ...

    def finish(self, results: Results) -> R_co: ...


@contextmanager
def open_command(
    prepared: P, report: Reporter, says: Reporter | None = None
) -> Iterator[tuple[Run, P, QualityOptions]]:
    """Hold the export's output folder and check it, open its run (`says`: the run's reporter, `report`
    by default), run the checks before any work; with --force, remove an earlier export's manifest and
    reports. Yields the run, the export in it, and the quality options preflight chose."""
    options = prepared.options
    with Run.open(
        options.output.out,
        options.run,
        says or report,
        before=prepared.check_output,
        vendored=prepared.vendored,
    ) as run:
        ready = prepared.in_run(run)
        quality = ready.preflight(run, report)
        if options.output.force:
            run.replace_finished(ready.finished_files)
        yield run, ready, quality


def run_command(
    prepared: P, build: Callable[[Run, P, QualityOptions], CommandGraph[R]], report: Reporter
) -> R:
    """One export: open its run, build its graph, run it on this machine, finish; on failure nothing the
    run wrote stays."""
    with open_command(prepared, report) as (run, ready, quality):
        command = build(run, ready, quality)
        return command.finish(Results(run.execute(command.graph)))


def write_manifest(
    run: Run,
    order: list[str],
    format: str,
    name: str,
    options: dict[str, Any],
    inputs: dict[str, Any],
    sections: dict[str, Any],
    notes: list[str] | None = None,
    quality: dict[str, Any] | None = None,
) -> tuple[Path, list[str]]:
    """Write the run's manifest (its timings and the stages reused from the cache, in graph `order`,
    which it reports); the manifest's path and those stages."""
    cached = run.cached_stages(order)
    if cached:
        run.report(f"reused from the cache: {', '.join(cached)}")
    manifest = Manifest(
        format,
        name,
        run.started_utc,
        run.versions,
        options,
        inputs,
        sections,
        dict(run.seconds),
        cached,
        notes or [],
        quality,
    )
    return manifest.write(run.out), cached
