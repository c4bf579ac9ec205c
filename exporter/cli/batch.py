"""`edge-export batch`: the command line of a batch, and its live progress (one line per running stage)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporter.cli.option_groups import with_options
from exporter.cli.options import RUN
from exporter.cli.render import console
from exporter.core.units import human_size

if TYPE_CHECKING:
    from exporter.commands.batch import BatchResult
    from exporter.inputs.options import RunOptions


class BatchProgress:
    """A line per running stage (what, since when) and one of totals; a log line per finished stage."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.totals = progress.add_task("planning", total=None)
        self.lines: dict[str, TaskID] = {}
        self.counts = {"end": 0, "failed": 0, "skipped": 0}
        self.stages = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind, stage = event["event"], event.get("stage", "")
        if kind == "planned":
            self.stages = event["stages"]
        elif kind == "start" and event.get("memory"):
            self.lines[stage] = self.progress.add_task(
                f"  {stage} (~{human_size(event['memory'])})", total=None
            )
        elif kind in self.counts:
            self.counts[kind] += 1
            if stage in self.lines:
                self.progress.remove_task(self.lines.pop(stage))
            if kind != "end":
                why = event.get("error") or f"needs {event.get('cause')}"
                self.progress.console.log(f"[red]{kind}[/] {stage}: {why}", highlight=False)
        done = self.counts["end"]
        self.progress.update(
            self.totals,
            description=f"{done}/{self.stages} stages done, {len(self.lines)} running, "
            f"{self.counts['failed']} failed, {self.counts['skipped']} skipped",
        )


@contextmanager
def batch_progress() -> Iterator[tuple[Callable[[str], None], BatchProgress]]:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:

        def report(message: str) -> None:
            progress.console.log(message)

        yield report, BatchProgress(progress)


def print_batch(result: BatchResult) -> None:
    table = Table(title=f"batch → {result.out}")
    for column in ("export", "adapter", "profile", "status", "size", "mean KLD", "gates", "sha256"):
        table.add_column(column, justify="right" if column in ("size", "mean KLD") else "left")
    for row in result.rows:
        table.add_row(
            row.export,
            row.adapter,
            row.profile,
            row.status,
            human_size(row.size_bytes) if row.size_bytes else "–",
            "–" if row.mean_kld is None else f"{row.mean_kld:.5f}",
            {None: "–", True: "pass", False: "FAIL"}[row.gates_passed],
            " + ".join(s[:12] for s in row.sha256) or "–",
        )
    console.print(table)
    for export in result.exports:
        for stage, error in export.failed.items():
            skipped = f"; skipped {', '.join(export.skipped)}" if export.skipped else ""
            console.print(f"[red]{export.name} failed[/] at {stage}: {error}{skipped}", highlight=False)
    console.print(
        f"{result.stages} stages ({result.reused} reused from the cache) in {result.seconds:.1f}s; "
        f"schedule: {result.schedule}"
    )
    for path in result.reports:
        console.print(f"report: {path}", highlight=False)


@with_options(RUN.without("jobs"))
def batch_command(
    run: RunOptions,
    plan: Annotated[
        Path, typer.Argument(help="The plan: a TOML file of bases, adapters, profiles and checks.")
    ],
    executor: Annotated[
        str,
        typer.Option(
            "--executor", help="local: this machine, within its cores and memory; ray: a Ray cluster."
        ),
    ] = "local",
    ray_address: Annotated[
        str,
        typer.Option(
            "--ray-address", help="The Ray cluster's head, HOST:PORT (default: the one started here)."
        ),
    ] = "auto",
    cores: Annotated[
        int | None,
        typer.Option(
            "--cores", min=1, help="Heavy stages at once on the local executor (default: every core)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace earlier exports in the plan's out.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of the plan's out.")] = None,
) -> None:
    """Run every export of a plan as one stage graph, on this machine or a Ray cluster."""
    from exporter.commands.batch import batch
    from exporter.inputs.options import BatchOptions

    options = BatchOptions(plan, run, executor, ray_address, cores, force, out)
    with batch_progress() as (report, on_event):
        result = batch(options, report, on_event)
    print_batch(result)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
