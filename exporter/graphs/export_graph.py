"""The graph of one merged export.

merge ──▶ convert ──▶ quantize:<P> … ──▶ templates ──▶ modelfiles ──▶ reference ──▶ quality:<P> … ──▶ report
  ├──▶ mmproj (a vision-language model's projector) ──▶ modelfiles, quality:<P> …
  └──▶ chat ─────────────────────────────┘     └──▶ parity        (imatrix between convert and quantize)

With --fit, the reference comes first (right after convert) and the search reads it: reference ──▶ fit ──▶
quantize:FIT-… ──▶ templates, modelfiles and quality:FIT-… like any profile's file.

Unless --keep-merged, `release` gives up the merged weights once nothing reads them: between convert (and
imatrix) and the quantizations with --no-check; with the check, after quality:source (whose 16-bit floor
reads them when the unquantized GGUF fails its gates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from converters.stop_tokens import StopCheck
from exporter.engine.graph import Results, Stage, StageGraph
from exporter.engine.run import Run
from exporter.graphs.export import PreparedExport
from exporter.graphs.export_manifest import ExportRecords, ExportResult, finish_export
from exporter.graphs.export_stages import Deployed, ExportStages
from exporter.inputs.options import QualityOptions
from exporter.inputs.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.quality.imatrix import ImatrixStage
from exporter.quality.reference import ArtifactQuality, Reference
from exporter.quality.tokenizer_parity import ParityReport
from exporter.quality.vision import ImageReference
from exporter.stages.chat import ChatRecord
from exporter.stages.fit import FitRecord
from exporter.stages.qlora import CHOOSE, CandidatePlan, QloraChoice, four_bit_graph, qlora_graph
from exporter.stages.quality import QualitySummary
from quant_profiles import QuantProfile


@dataclass(frozen=True)
class ExportNodes:
    """The handles of one merged export's nodes (each reads as its stage's record)."""

    choose: Stage[QloraChoice] | None  # a QLoRA adapter's merge-base choice
    merge: Stage[MergedModel]
    chat: Stage[ChatRecord]
    convert: Stage[BuiltGGUF]
    imatrix: Stage[ImatrixStage] | None
    mmproj: Stage[BuiltGGUF] | None  # a vision-language model's projector
    fit: Stage[FitRecord] | None
    quantized: dict[str, Stage[BuiltGGUF]]  # profile name (or the fitted profile's) -> its quantize node
    parity: Stage[ParityReport]
    modelfiles: Stage[Deployed]
    stops: Stage[dict[str, StopCheck]]
    report: Stage[QualitySummary] | None

    def records(self, r: Results) -> ExportRecords:
        return ExportRecords(
            r.optional(self.choose),
            r[self.merge],
            r[self.chat],
            r[self.convert],
            r.optional(self.imatrix),
            r.optional(self.mmproj),
            r.optional(self.fit),
            {label: r[node] for label, node in self.quantized.items()},
            r[self.parity],
            r[self.modelfiles],
            r[self.stops],
            r.optional(self.report),
        )


def wire_export(g: StageGraph, s: ExportStages, qlora: StageGraph | None) -> ExportNodes:
    """Add the stages of one merged export to `g` (names as in the module's docstring). `qlora`: the stages
    of a QLoRA adapter's merge-base choice (exporter/stages/qlora.py), included under their own names;
    the merge, the reference and the report need its node CHOOSE."""
    choose: Stage[QloraChoice] | None = None
    if qlora is not None:
        g.include("", qlora)
        choose = Stage(CHOOSE)
    chosen = () if choose is None else (choose,)
    merge = g.add("merge", lambda r: s.merge(r.optional(choose)), chosen)
    chat = g.add("chat", lambda r: s.chat(r[merge]), (merge,), heavy=False)
    convert = g.add("convert", lambda r: s.convert(r[merge]), (merge,))
    mmproj, projector = _wire_mmproj(g, s, merge)
    imatrix = None
    if s.options.has_imatrix:
        imatrix = g.add("imatrix", lambda r: s.imatrix(r[merge], r[convert]), (merge, convert))
    source = (convert,) if imatrix is None else (convert, imatrix)
    releases = not s.options.keep_merged
    if releases and not s.options.check:  # nothing reads the merged weights after the conversion
        read = (merge, *source, *projector)
        release = g.add("release", lambda r: s.release_merged(r[merge]), read, heavy=False)
        source = (*source, release)
    quantized = {
        p.name: g.add(f"quantize:{p.name}", _quantize(s, p, convert, imatrix), source, shared=True)
        for p in s.layout.profiles
    }
    reference: Stage[Reference] | None = None
    fit: Stage[FitRecord] | None = None
    if s.options.fit is not None:  # the search needs the reference before the fitted file exists
        reference = g.add("reference", _reference(s, merge, convert, choose), (merge, convert, *chosen))
        fit, quantized[s.layout.fit_label or ""] = _wire_fit(g, s, convert, imatrix, reference, source)
    builds = tuple(quantized.values())

    def gathered(r: Results) -> dict[str, BuiltGGUF]:
        return {label: r[node] for label, node in quantized.items()}

    parity = g.add("parity", lambda r: s.parity(r[merge], r[convert]), (merge, convert), heavy=False)
    templates = g.add(
        "templates",
        lambda r: s.templates(r[merge], r[chat], [r[convert], *gathered(r).values()]),
        (merge, chat, convert, *builds),
        heavy=False,
    )
    needs = (chat, templates, *builds, *projector)
    modelfiles = g.add(
        "modelfiles", lambda r: s.modelfiles(r[chat], gathered(r), r.optional(mmproj)), needs, heavy=False
    )
    stops = g.add("stops", lambda r: s.stops(r[chat], gathered(r)), (chat, *builds))
    report = None
    if s.options.check:
        if reference is None:
            reference = g.add(
                "reference", _reference(s, merge, convert, choose), (merge, convert, modelfiles, *chosen)
            )
        images = None if mmproj is None else g.add("reference:images", lambda r: s.images(), (reference,))
        scored = _wire_scores(g, s, reference, convert, merge, builds, images, mmproj)
        if fit is not None:
            node, scoring = builds[-1], _score_fitted(s, fit, reference, convert, builds[-1], images, mmproj)
            seen = (*projector, *([images] if images else []))
            scored.append(
                g.add(f"quality:{s.layout.fit_label}", scoring, (reference, convert, node, fit, *seen))
            )
        if releases:  # after the 16-bit floor, which reads them when the unquantized GGUF fails its gates
            read = (merge, *source, *projector, scored[0])
            g.add("release", lambda r: s.release_merged(r[merge]), read, heavy=False)
        report = g.add(
            "report",
            lambda r: s.report(
                r[reference], [r[q] for q in scored], r.optional(choose), r.optional(fit), r.optional(images)
            ),
            (reference, *scored, *chosen, *([fit] if fit else []), *([images] if images else [])),
            heavy=False,
        )
    return ExportNodes(
        choose, merge, chat, convert, imatrix, mmproj, fit, quantized, parity, modelfiles, stops, report
    )


def _wire_scores(
    g: StageGraph,
    s: ExportStages,
    reference: Stage[Reference],
    convert: Stage[BuiltGGUF],
    merge: Stage[MergedModel],
    builds: tuple[Stage[BuiltGGUF], ...],
    images: Stage[ImageReference | str] | None,
    mmproj: Stage[BuiltGGUF] | None,
) -> list[Stage[ArtifactQuality | None]]:
    """quality:source and quality:<P> for each profile (with images: each GGUF with the projector too)."""
    seen = (reference, convert, *([mmproj] if mmproj else []), *([images] if images else []))
    scored = [
        g.add(
            "quality:source", _score(s, None, reference, convert, None, merge, images, mmproj), (*seen, merge)
        )
    ]
    scored += [
        g.add(
            f"quality:{p.name}", _score(s, p, reference, convert, node, None, images, mmproj), (*seen, node)
        )
        for p, node in zip(s.layout.profiles, builds, strict=False)
    ]
    return scored


def _wire_mmproj(
    g: StageGraph, s: ExportStages, merge: Stage[MergedModel]
) -> tuple[Stage[BuiltGGUF] | None, tuple[Stage[BuiltGGUF], ...]]:
    """A vision-language model's projector, converted from the merged folder (and its node as a tuple)."""
    if s.layout.mmproj is None:
        return None, ()
    mmproj = g.add("mmproj", lambda r: s.mmproj(r[merge]), (merge,))
    return mmproj, (mmproj,)


def _wire_fit(
    g: StageGraph,
    s: ExportStages,
    convert: Stage[BuiltGGUF],
    imatrix: Stage[ImatrixStage] | None,
    reference: Stage[Reference],
    source: tuple[Stage[Any], ...],
) -> tuple[Stage[FitRecord], Stage[BuiltGGUF]]:
    """The search (reading the reference) and the quantization of the profile it writes."""
    fit = g.add("fit", lambda r: s.fit(r[convert], r[reference], r.optional(imatrix)), (*source, reference))
    quantize = g.add(
        f"quantize:{s.layout.fit_label}",
        lambda r: s.quantize(r[fit].profile, r[convert], r.optional(imatrix)),
        (fit, *source),
    )
    return fit, quantize


def _score_fitted(
    s: ExportStages,
    fit: Stage[FitRecord],
    reference: Stage[Reference],
    convert: Stage[BuiltGGUF],
    built: Stage[BuiltGGUF],
    images: Stage[ImageReference | str] | None = None,
    mmproj: Stage[BuiltGGUF] | None = None,
) -> Callable[[Results], ArtifactQuality | None]:
    def score(r: Results) -> ArtifactQuality | None:
        seen = None if images is None or mmproj is None else (r[images], r[mmproj])
        return s.score(r[fit].profile, r[reference], r[convert], r[built], None, seen)

    return score


def _reference(
    s: ExportStages, merge: Stage[MergedModel], convert: Stage[BuiltGGUF], choose: Stage[QloraChoice] | None
) -> Callable[[Results], Reference]:
    return lambda r: s.reference(r[merge], r[convert], r.optional(choose))


def _quantize(
    s: ExportStages, profile: QuantProfile, convert: Stage[BuiltGGUF], imatrix: Stage[ImatrixStage] | None
) -> Callable[[Results], BuiltGGUF]:
    return lambda r: s.quantize(profile, r[convert], r.optional(imatrix))


def _score(
    s: ExportStages,
    profile: QuantProfile | None,
    reference: Stage[Reference],
    convert: Stage[BuiltGGUF],
    built: Stage[BuiltGGUF] | None,
    merge: Stage[MergedModel] | None = None,
    images: Stage[ImageReference | str] | None = None,
    mmproj: Stage[BuiltGGUF] | None = None,
) -> Callable[[Results], ArtifactQuality | None]:
    def score(r: Results) -> ArtifactQuality | None:
        seen = None if images is None or mmproj is None else (r[images], r[mmproj])
        return s.score(profile, r[reference], r[convert], r.optional(built), r.optional(merge), seen)

    return score


class ExportGraph:
    """The stage graph of one merged export, and its finish: the manifest from its stages' records."""

    def __init__(self, stages: ExportStages, qlora: StageGraph | None = None):
        self.stages = stages
        self.graph = StageGraph()
        self.nodes = wire_export(self.graph, stages, qlora)
        # the merge-base choice's stages are not the export's own: left out of its cached stages
        self.choice_stages = set(qlora.nodes) if qlora is not None else set()

    def finish(self, r: Results) -> ExportResult:
        order = [n for n in self.graph.order if n not in self.choice_stages]
        return finish_export(self.stages, self.nodes.records(r), order)


def export_graph(run: Run, prepared: PreparedExport, quality: QualityOptions) -> ExportGraph:
    """The graph of one prepared export in an open run, checked with `quality` (what preflight returned)."""
    options = prepared.options
    inputs = ModelInputs.hashed(prepared.base_dir, tuple(prepared.adapters), run.cache.hashes)
    choice, trained_on = None, prepared.trained_on
    if trained_on is not None and prepared.four_bit_base is not None:
        # the base is the training base itself: one merge base
        choice = four_bit_graph(prepared.four_bit_base, inputs, trained_on)
    elif trained_on is not None:  # the merge candidates: stages that the export's merge waits for
        layout = prepared.layout
        plan = CandidatePlan(layout.name, options.dtype, layout.profiles, prepared.registry, quality)
        mode = options.qlora.merge_base or "auto"
        choice = qlora_graph(run, inputs, trained_on, mode, options.check, plan)
    stages = ExportStages(run, inputs, prepared.layout, prepared.registry, options, quality)
    return ExportGraph(stages, choice)
