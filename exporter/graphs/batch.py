"""The stage graph of a batch: every export's own graph (merge-quantize's or runtime-lora's) under its name.

    <export>/merge ──▶ <export>/convert ──▶ <export>/quantize:<P> … ──▶ …      one per merged export
    <group>/convert-base ──▶ <group>/quantize:<P> … , <group>/lora:<A> … ──▶ …   one base per runtime group

Nothing is built twice: a merged export merges and converts once and fans out to its profiles; a
runtime-LoRA group converts its base once for all its adapters; stages that two exports share (the
same inputs, options and tools) are one cache entry, built by whichever gets its lock first.

The same graph is built in the driver and, for Ray, again in each worker (`remote_stage`), from the
same specs: the worker runs one node of it and reports back what the driver's run records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exporter.engine.graph import Results, StageGraph
from exporter.engine.memory import estimate_stage, stage_kind
from exporter.engine.run import Run, silent
from exporter.graphs.export import PreparedExport, prepare_export
from exporter.graphs.export_graph import ExportGraph, export_graph
from exporter.graphs.runtime import PreparedRuntime, prepare_runtime
from exporter.graphs.runtime_graph import RuntimeGraph, runtime_graph
from exporter.inputs.batch_plan import Plan, PlanJob
from exporter.inputs.options import (
    ExportOptions,
    InputOptions,
    OutputOptions,
    ProfileOptions,
    QualityOptions,
    RunOptions,
    RuntimeLoraOptions,
)

Prepared = PreparedExport | PreparedRuntime


@dataclass(frozen=True)
class JobSpec:
    """One export of the plan as its command's options, with the quality options its preflight chose."""

    job: PlanJob
    options: ExportOptions | RuntimeLoraOptions
    quality: QualityOptions | None = None


def job_options(plan: Plan, job: PlanJob, run: RunOptions, force: bool) -> ExportOptions | RuntimeLoraOptions:
    """The options merge-quantize or runtime-lora would get for this export of the plan. Each stage gets one
    thread unless --threads says otherwise: the executors run stages side by side, a core each, and
    llama.cpp's threads spin at every barrier, so two evaluations sharing cores run many times slower."""
    run = replace(run, threads=run.threads or 1)
    inputs = InputOptions(adapters=job.adapters, base=str(job.base))
    output = OutputOptions(plan.out / job.name, job.name, force)
    profiles = ProfileOptions(job.profiles, plan.profile_files)
    quality = QualityOptions(
        eval_data=job.eval_data, eval_tokens=job.eval_tokens, gates=job.gates, threads=run.threads
    )
    if job.kind == "runtime":
        return RuntimeLoraOptions(inputs, output, profiles, run, quality, job.check)
    # Exports of the same merge share its cache entry: they keep its weights, so that none releases what
    # another still converts from.
    merge = (job.adapters, job.base, job.dtype)
    shared = sum(1 for j in plan.jobs if j.kind != "runtime" and (j.adapters, j.base, j.dtype) == merge) > 1
    return ExportOptions(
        inputs, output, profiles, run, quality, job.check, job.dtype, keep_merged=shared, fit=job.fit
    )


def prepare(options: ExportOptions | RuntimeLoraOptions) -> Prepared:
    if isinstance(options, ExportOptions):
        return prepare_export(options)
    return prepare_runtime(options)


class BatchGraph:
    """One graph of every export in `specs`, each in its own run (`runs`: export name -> Run)."""

    def __init__(self, specs: tuple[JobSpec, ...], prepared: dict[str, Prepared], runs: dict[str, Run]):
        self.specs = specs
        self.graph = StageGraph()
        self.parts: dict[str, ExportGraph | RuntimeGraph] = {}
        for spec in specs:
            name, quality = spec.job.name, spec.quality
            assert quality is not None
            ready = prepared[name]
            part: ExportGraph | RuntimeGraph
            if isinstance(ready, PreparedExport):
                part = export_graph(runs[name], ready, quality)
            else:
                part = runtime_graph(runs[name], ready, quality)
            self.parts[name] = part
            estimates = _Estimates(ready, quality.reference_dtype)
            self.graph.include(name, part.graph, estimates)

    def results_of(self, export: str, results: dict[str, Any]) -> Results:
        """One export's results under the names its own graph gives them."""
        prefix = f"{export}/"
        return Results(
            {name.removeprefix(prefix): value for name, value in results.items() if name.startswith(prefix)}
        )


class _Estimates:
    """The memory estimate of each stage of one export (estimated once per stage kind; a QLoRA merge
    candidate's stages as the export's own: w16:merge as merge)."""

    def __init__(self, prepared: Prepared, reference_dtype: str):
        self.prepared, self.reference_dtype = prepared, reference_dtype
        self.known: dict[str, int] = {}

    def __call__(self, stage: str) -> int:
        kind = stage_kind(stage)
        if kind not in self.known:
            self.known[kind] = estimate_stage(
                stage, self.prepared.base_dir, self.prepared.adapters, self.reference_dtype
            )
        return self.known[kind]


# ---------------------------------------------------------------------------------- on a Ray worker


@dataclass
class StageDelta:
    """What a stage run on a worker recorded in its run, for the driver's run: timings, reuse, outputs."""

    seconds: dict[str, float] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)
    claimed: list[Path] = field(default_factory=list)


def absorb(runs: dict[str, Run], name: str, delta: StageDelta) -> None:
    """Record a remote stage's delta in the driver's run of its export."""
    run = runs[name.split("/", 1)[0]]
    run.seconds.update(delta.seconds)
    run.reused |= delta.reused
    for path in delta.claimed:
        run.guard.claim(path)  # a failed export removes what its remote stages linked into it


_WORKER_GRAPHS: dict[str, tuple[BatchGraph, dict[str, Run]]] = {}


def remote_stage(specs: tuple[JobSpec, ...], name: str, inputs: Results) -> tuple[Any, StageDelta]:
    """Run node `name` of the batch graph of `specs` in this (worker) process. The graph is built once per
    worker and batch; its runs hold no output locks (the driver holds them) and share the stage cache."""
    key = hashlib.sha256(repr(specs).encode()).hexdigest()
    if key not in _WORKER_GRAPHS:
        prepared = {spec.job.name: prepare(spec.options) for spec in specs}
        runs = {
            spec.job.name: Run(
                spec.options.output.out, spec.options.run, silent, prepared[spec.job.name].vendored
            )
            for spec in specs
        }
        _WORKER_GRAPHS.clear()
        _WORKER_GRAPHS[key] = (BatchGraph(specs, prepared, runs), runs)
    batch, runs = _WORKER_GRAPHS[key]
    run = runs[name.split("/", 1)[0]]
    run.seconds.clear()
    run.reused.clear()
    run.guard.paths.clear()
    try:
        result = batch.graph.nodes[name].run(inputs)
    finally:
        run.cache.hashes.save()
    return result, StageDelta(dict(run.seconds), set(run.reused), list(run.guard.paths))
