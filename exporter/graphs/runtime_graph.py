"""The graph of one runtime-LoRA export: one quantized base per profile, shared by small GGUF LoRA adapters.

    convert-base ──▶ quantize:<P> …  ─┬─▶ modelfiles ──▶ reference:<A> ──▶ quality:<A>:<P> … ──▶ report
               └──▶ lora:<A> … ───────┘
    a vision-language base: mmproj (from the base) ──▶ modelfiles; reference:<A>:images ──▶ quality:<A>:<P>
    with --compare-merged, per adapter: merge:<A> ──▶ convert:<A> ──▶ quantize:<A>:<P> ──▶ merged:<A>:<P>

The same stages as merge-quantize, in another graph: the merged comparison is built beside the
runtime path (under <out>/merged/<adapter>/), scored against the same reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from exporter.engine.graph import Results, Stage, StageGraph
from exporter.engine.run import Run
from exporter.engine.stage_cache import CacheEntry
from exporter.graphs.compare_merged import ComparisonNodes, MergedComparison, MergedScore
from exporter.graphs.runtime import PreparedRuntime
from exporter.graphs.runtime_manifest import RuntimeLoraResult, RuntimeRecords, finish_runtime
from exporter.graphs.runtime_stages import RuntimeDeployment, RuntimeQuality, RuntimeStages
from exporter.inputs.options import QualityOptions
from exporter.inputs.records import BuiltGGUF, ModelInputs
from exporter.quality.reference import PairQuality, Reference
from exporter.quality.vision import ImageReference
from exporter.stages.lora import RuntimeAdapter
from quant_profiles import QuantProfile


@dataclass(frozen=True)
class RuntimeNodes:
    """The handles of one runtime-LoRA export's nodes (each reads as its stage's record)."""

    convert_base: Stage[CacheEntry]
    bases: dict[str, Stage[BuiltGGUF]]  # profile name -> its quantized base
    loras: dict[str, Stage[RuntimeAdapter]]  # adapter name -> its GGUF LoRA
    modelfiles: Stage[RuntimeDeployment]
    merged: dict[str, ComparisonNodes]  # adapter name -> its merged branch (--compare-merged)
    report: Stage[RuntimeQuality] | None
    mmproj: Stage[BuiltGGUF] | None = None  # a vision-language base's projector

    def records(self, r: Results) -> RuntimeRecords:
        return RuntimeRecords(
            r[self.convert_base],
            {label: r[node] for label, node in self.bases.items()},
            [r[node] for node in self.loras.values()],
            r[self.modelfiles],
            {n: {p: r[node] for p, node in branch.quantized.items()} for n, branch in self.merged.items()},
            r.optional(self.report),
            r.optional(self.mmproj),
        )


def wire_runtime(g: StageGraph, s: RuntimeStages) -> RuntimeNodes:
    """Add the stages of one runtime-LoRA export to `g` (names as in the module's docstring)."""
    layout = s.layout
    entry = g.add("convert-base", lambda _: s.convert_base())
    bases = {
        p.name: g.add(f"quantize:{p.name}", _quantize_base(s, p, entry), (entry,), shared=True)
        for p in layout.profiles
    }
    loras = {n: g.add(f"lora:{n}", _lora(s, n, entry), (entry,)) for n in layout.adapter_names}
    mmproj = None if layout.mmproj is None else g.add("mmproj", lambda _: s.mmproj())
    projector = () if mmproj is None else (mmproj,)

    def modelfiles_stage(r: Results) -> RuntimeDeployment:
        built = {label: r[node] for label, node in bases.items()}
        return s.modelfiles(built, {n: r[node] for n, node in loras.items()}, r.optional(mmproj))

    needs = (*bases.values(), *loras.values(), *projector)
    modelfiles = g.add("modelfiles", modelfiles_stage, needs, heavy=False)
    branches: dict[str, ComparisonNodes] = {}  # --compare-merged: adapter name -> its merged branch
    if not s.options.check:
        return RuntimeNodes(entry, bases, loras, modelfiles, branches, None, mmproj)
    references: dict[str, Stage[Reference]] = {}
    images: dict[str, Stage[ImageReference | str]] = {}
    pairs: list[Stage[PairQuality]] = []
    merged: list[Stage[MergedScore]] = []
    for n in layout.adapter_names:
        references[n] = g.add(f"reference:{n}", _reference(s, n), (modelfiles,))
        seen = None
        if mmproj is not None:
            images[n] = g.add(f"reference:{n}:images", _images(s, n), (references[n],))
            seen = (images[n], mmproj)
        for p in layout.profiles:
            needs = (references[n], bases[p.name], loras[n], *(seen or ()))
            scoring = _score_pair(s, n, p, references[n], bases[p.name], loras[n], seen)
            pairs.append(g.add(f"quality:{n}:{p.name}", scoring, needs))
        if s.options.compare_merged:
            adapter, _correction = s.adapters[n]
            branch = MergedComparison(s.run, s.inputs.only(adapter), layout.merged(n), s.registry, s.quality)
            branches[n] = branch.add(g, n, layout.profiles, modelfiles, references[n])
            merged += branches[n].scored

    def report_stage(r: Results) -> RuntimeQuality:
        references_seen = {n: r[ref] for n, ref in references.items()}
        return s.report(
            [r[q] for q in pairs],
            [r[m] for m in merged],
            references_seen,
            {n: r[i] for n, i in images.items()},
        )

    report = g.add(
        "report", report_stage, (*references.values(), *images.values(), *pairs, *merged), heavy=False
    )
    return RuntimeNodes(entry, bases, loras, modelfiles, branches, report, mmproj)


def _quantize_base(
    s: RuntimeStages, profile: QuantProfile, entry: Stage[CacheEntry]
) -> Callable[[Results], BuiltGGUF]:
    return lambda r: s.quantize_base(profile, r[entry])


def _lora(s: RuntimeStages, name: str, entry: Stage[CacheEntry]) -> Callable[[Results], RuntimeAdapter]:
    return lambda r: s.lora(name, r[entry])


def _reference(s: RuntimeStages, name: str) -> Callable[[Results], Reference]:
    return lambda _: s.reference(name)


def _images(s: RuntimeStages, name: str) -> Callable[[Results], ImageReference | str]:
    return lambda _: s.images(name)


def _score_pair(
    s: RuntimeStages,
    name: str,
    profile: QuantProfile,
    reference: Stage[Reference],
    base: Stage[BuiltGGUF],
    lora: Stage[RuntimeAdapter],
    images: tuple[Stage[ImageReference | str], Stage[BuiltGGUF]] | None = None,
) -> Callable[[Results], PairQuality]:
    def score(r: Results) -> PairQuality:
        seen = None if images is None else (r[images[0]], r[images[1]])
        return s.score_pair(name, profile, r[reference], r[base], r[lora], seen)

    return score


class RuntimeGraph:
    """The stage graph of one runtime-LoRA export, and its finish: the manifest from its stages' records."""

    def __init__(self, stages: RuntimeStages):
        self.stages = stages
        self.graph = StageGraph()
        self.nodes = wire_runtime(self.graph, stages)

    def finish(self, r: Results) -> RuntimeLoraResult:
        return finish_runtime(self.stages, self.nodes.records(r), self.graph.order)


def runtime_graph(run: Run, prepared: PreparedRuntime, quality: QualityOptions) -> RuntimeGraph:
    """The graph of one prepared runtime-LoRA export in an open run."""
    p = prepared
    inputs = ModelInputs.hashed(p.base_dir, tuple(p.adapters), run.cache.hashes)
    stages = RuntimeStages.of(run, inputs, p.layout, p.registry, p.options, quality, p.corrections, p.source)
    return RuntimeGraph(stages)
