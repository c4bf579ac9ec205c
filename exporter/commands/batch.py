"""`edge-export batch PLAN.toml`: every export of a plan as one stage graph, run here or on a Ray cluster.

    plan ──▶ one run per export (its folder locked, checked, preflighted) ──▶ one graph (exporter.graphs.batch)
         ──▶ executor: local (cores × memory budget) or Ray (a task per heavy stage)
         ──▶ each export that finished: its manifest, Modelfiles, report (as merge-quantize / runtime-lora)
         ──▶ <out>/batch-report.{json,md}, batch.png, batch-junit.xml, batch-schedule.jsonl

A stage that fails fails its export (what needs it is skipped, what that export wrote is removed), not
the batch: the other exports finish, and the report says which stage failed and what it skipped.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from exporter.core.atomic import write_text_atomic
from exporter.core.errors import INTERNAL_ERROR_EXIT, ExportError, InputError
from exporter.core.faults import KILL_ENV, kill_point
from exporter.core.paths import cache_root, refuse_output_in_inputs
from exporter.engine.command import open_command
from exporter.engine.graph import Budget, BudgetedExecutor, Event, Outcome
from exporter.engine.memory import available_memory
from exporter.engine.run import Reporter, Run, silent
from exporter.graphs.batch import BatchGraph, JobSpec, absorb, job_options, prepare, remote_stage
from exporter.graphs.export_manifest import ExportResult
from exporter.graphs.runtime_manifest import RuntimeLoraResult
from exporter.inputs.batch_plan import load_plan
from exporter.inputs.options import BatchOptions
from exporter.quality.batch_report import BATCH_PLAN, BATCH_SCHEDULE, BatchRow, write_batch_reports


@dataclass
class ExportOutcome:
    """One export of the batch: its command's result, or the stage that failed and what it skipped."""

    name: str
    kind: str
    result: ExportResult | RuntimeLoraResult | None = None
    failed: dict[str, str] = field(default_factory=dict)  # stage -> error
    skipped: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class BatchResult:
    out: Path
    exports: list[ExportOutcome]
    rows: list[BatchRow]
    reports: list[Path]
    schedule: Path
    seconds: float
    stages: int
    reused: int

    @property
    def exit_code(self) -> int:
        """The worst: an export's failure (2 bad input, 3 stage, 4 internal), then 1 for a failed gate."""
        failed = [e.exit_code for e in self.exports if e.exit_code]
        if failed:
            return max(failed)
        return 0 if all(row.passed for row in self.rows) else 1


def batch(
    options: BatchOptions, report: Reporter = silent, on_event: Callable[[Event], None] | None = None
) -> BatchResult:
    """Run every export of the plan; see the module's docstring."""
    start = time.perf_counter()
    plan = load_plan(options.plan)
    if options.out is not None:
        plan = replace(plan, out=options.out.resolve())
    # A batch run again on its own out resumes: its finished exports are replaced (from the cache).
    force = options.force or _own_out(plan.out, plan.source)
    specs = [JobSpec(job, job_options(plan, job, options.run, force)) for job in plan.jobs]
    _refuse_output_in_inputs(plan.out, specs)
    prepared = {spec.job.name: prepare(spec.options) for spec in specs}
    with ExitStack() as stack:
        runs: dict[str, Run] = {}
        resolved = []
        for spec in specs:
            name = spec.job.name
            says = functools.partial(_prefixed, report, name)  # which export a stage's message is about
            runs[name], prepared[name], quality = stack.enter_context(
                open_command(prepared[name], report, says)
            )
            resolved.append(JobSpec(spec.job, spec.options, quality))
        graph = BatchGraph(tuple(resolved), prepared, runs)
        write_text_atomic(plan.out / BATCH_PLAN, json.dumps({"plan": str(plan.source.resolve())}) + "\n")
        report(f"{len(specs)} exports, {len(graph.graph.nodes)} stages, executor {options.executor}")
        if on_event is not None:
            on_event({"event": "planned", "stages": len(graph.graph.nodes)})
        outcome = _execute(options, plan.out, graph, runs, report, on_event)
        kill_point("manifest")
        exports = [_finish(graph, runs, spec, outcome) for spec in resolved]
    rows = [row for export in exports for row in _rows(export, plan.out, resolved)]
    seconds = time.perf_counter() - start
    reports = write_batch_reports(plan.out, options.plan, rows, seconds, options.executor)
    reused = sum(len(run.reused) for run in runs.values())
    schedule = plan.out / BATCH_SCHEDULE
    return BatchResult(plan.out, exports, rows, reports, schedule, seconds, len(graph.graph.nodes), reused)


def _prefixed(report: Reporter, export: str, message: str) -> None:
    report(f"{export}: {message}")


def _own_out(out: Path, plan: Path) -> bool:
    """Whether `out` was written by a batch of this same plan file."""
    try:
        return json.loads((out / BATCH_PLAN).read_text())["plan"] == str(plan.resolve())
    except (OSError, ValueError, KeyError):
        return False


def _refuse_output_in_inputs(out: Path, specs: list[JobSpec]) -> None:
    for spec in specs:
        folders = [("base", spec.job.base), *(("adapter", path) for path, _ in spec.job.adapters)]
        files = [("evaluation data", spec.job.eval_data)]
        refuse_output_in_inputs(out, folders, files, flag="The plan's out")


def _execute(
    options: BatchOptions,
    out: Path,
    graph: BatchGraph,
    runs: dict[str, Run],
    report: Reporter,
    on_event: Callable[[Event], None] | None,
) -> Outcome:
    """Run the graph with the chosen executor; its scheduling log goes to <out>/batch-schedule.jsonl."""
    log = (out / BATCH_SCHEDULE).open("w", encoding="utf-8")

    def record(event: Event) -> None:
        log.write(json.dumps(event) + "\n")
        log.flush()
        if on_event is not None:
            on_event(event)

    try:
        if options.executor == "ray":
            return _on_ray(options, graph, runs, report, record)
        budget = Budget(options.cores or os.cpu_count() or 1, options.run.max_memory or available_memory())
        largest = max(graph.graph.nodes.values(), key=lambda node: node.memory)
        if largest.memory > budget.memory:
            raise InputError(
                f"Stage {largest.name} needs about {largest.memory / 2**30:.2f} GiB, more than the memory budget "
                f"of {budget.memory / 2**30:.2f} GiB (--max-memory, or what this machine has free). Raise "
                "--max-memory, free memory, or run the batch on a Ray cluster with a larger node."
            )
        # transformers resolves its names lazily, and two stage threads resolving one at once can fail
        # ("cannot import name 'AutoTokenizer'"): resolve the ones the light stages use before they start.
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401

        report(f"local executor: {budget.cpus} heavy stage(s) at once within {budget.memory / 2**30:.1f} GiB")
        return BudgetedExecutor(budget, record).run(graph.graph)
    finally:
        log.close()


def _on_ray(
    options: BatchOptions,
    graph: BatchGraph,
    runs: dict[str, Run],
    report: Reporter,
    record: Callable[[Event], None],
) -> Outcome:
    from exporter.engine.graph_ray import RayExecutor

    package_root = str(Path(__file__).resolve().parents[2])
    env = {
        "EDGE_EXPORT_CACHE_DIR": str(cache_root().resolve()),
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if os.environ.get(KILL_ENV):  # the fault points reach the workers, where the stages run
        env[KILL_ENV] = os.environ[KILL_ENV]
    report(f"Ray executor: cluster {options.ray_address}, stage cache {env['EDGE_EXPORT_CACHE_DIR']}")
    executor = RayExecutor(
        options.ray_address,
        functools.partial(remote_stage, graph.specs),
        functools.partial(absorb, runs),
        env,
        record,
    )
    return executor.run(graph.graph)


def _finish(graph: BatchGraph, runs: dict[str, Run], spec: JobSpec, outcome: Outcome) -> ExportOutcome:
    """The export's manifest if every stage of it finished; else remove what it wrote, and say why."""
    name, run = spec.job.name, runs[spec.job.name]
    prefix = f"{name}/"
    export = ExportOutcome(name, spec.job.kind)
    for stage, error in outcome.failed.items():
        if stage.startswith(prefix):
            export.failed[stage.removeprefix(prefix)] = f"{type(error).__name__}: {error}"
            code = error.exit_code if isinstance(error, ExportError) else INTERNAL_ERROR_EXIT
            export.exit_code = max(export.exit_code, code)
    export.skipped = [s.removeprefix(prefix) for s in outcome.skipped if s.startswith(prefix)]
    if not export.failed:
        try:
            export.result = graph.parts[name].finish(graph.results_of(name, outcome.results))
            return export
        except Exception as exc:  # noqa: BLE001 - fails this export only
            export.failed["manifest"] = f"{type(exc).__name__}: {exc}"
            export.exit_code = exc.exit_code if isinstance(exc, ExportError) else INTERNAL_ERROR_EXIT
    run.guard.rollback()
    return export


def _rows(export: ExportOutcome, out: Path, specs: list[JobSpec]) -> list[BatchRow]:
    spec = next(s for s in specs if s.job.name == export.name)
    result = export.result
    if result is None:
        stage, error = next(iter(export.failed.items()))
        detail = f"{stage}: {error}"[:300] + (
            f" (skipped {len(export.skipped)} stages)" if export.skipped else ""
        )
        adapters = [export.name] if export.kind == "merged" else [p.name for p, _ in spec.job.adapters]
        return [
            BatchRow(export.name, export.kind, adapter, profile, "failed", detail=detail)
            for adapter in adapters
            for profile in spec.job.profiles
        ]
    if isinstance(result, ExportResult):
        scored = {item.label: item for item in (result.quality.items if result.quality else [])}
        return [
            BatchRow(
                export.name,
                "merged",
                export.name,
                a.profile,
                "ok",
                (str(a.path.relative_to(out)),),
                a.size_bytes,
                (a.sha256,),
                scored[a.profile].metrics.get("mean_kld") if a.profile in scored else None,
                scored[a.profile].passed if a.profile in scored else None,
            )  # fmt: skip
            for a in result.artifacts
        ]
    pairs = {(q.adapter, q.profile): q for q in result.quality}
    rows = []
    for adapter in result.adapters:
        for profile, base in result.bases.items():
            pair = pairs.get((adapter.name, profile))
            base_sha = _manifest_sha(result, base.name)
            rows.append(
                BatchRow(
                    export.name,
                    "runtime",
                    adapter.name,
                    profile,
                    "ok",
                    (str(base.relative_to(out)), str(adapter.gguf.relative_to(out))),
                    base.stat().st_size + adapter.size_bytes,
                    (base_sha, adapter.sha256),
                    pair.runtime.metrics.get("mean_kld") if pair else None,
                    pair.passed if pair else None,
                )  # fmt: skip
            )
    return rows


def _manifest_sha(result: RuntimeLoraResult, file_name: str) -> str:
    manifest = json.loads(result.manifest.read_text())
    return next(b["sha256"] for b in manifest["bases"] if b["path"] == file_name)
