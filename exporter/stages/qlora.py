"""QLoRA's merge candidates: W16 + ΔW and dequant(Q4(W16)) + ΔW, each merged, converted, quantized and
scored against the model as trained (4-bit base + adapter) and the 16-bit reference; then the choice.

    reference:as-trained, reference:16-bit ──────────────────────────────┐ (every score)
    w16:merge ─▶ w16:convert ─▶ w16:quantize:<P> … ─▶ w16:quality… ─▶ w16:candidate ─────┐
    dequant:dequantize ─▶ dequant:merge ─▶ … ─────────────────────▶ dequant:candidate ─┴─▶ choose

The choice is a graph of stages (`qlora_graph`) that the export's graph includes and its merge needs, so
one command, a batch and a Ray cluster schedule the candidates like any other stage. Candidates live in
the stage cache only: the export links the kept one into the output (its stages are then reused), so the
other candidate's files never reach the output folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.core.errors import StageError
from exporter.engine.graph import Results, Stage, StageGraph
from exporter.engine.run import Run
from exporter.engine.stage_keys import dequantize_key, losses_key, quality_key, unpack_key
from exporter.inputs.options import QualityOptions
from exporter.inputs.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.inputs.trained_on import TrainedOn
from exporter.qlora.merge_base import MergeBaseDecision, decide_merge_base
from exporter.qlora.report import CANDIDATE_TITLES, merge_base_section
from exporter.qlora.round_trip import write_dequantized_base
from exporter.qlora.unpack import unpack_four_bit_base
from exporter.quality.reference import Reference, evaluate_gguf
from exporter.stages.gguf import convert_stage, gguf_record, merged_convert_key, quantize_stage
from exporter.stages.merge import merge_stage
from exporter.stages.quality import reference_stage, score_stage
from quant_profiles import ProfileRegistry, QuantProfile

DEQUANTIZED_DIR = "base"
LOSSES_FILE = "losses.npy"
CANDIDATES = ("w16", "dequant")
CHOOSE = "choose"  # the node whose result is the QloraChoice
AS_TRAINED = "reference:as-trained"
SIXTEEN_BIT = "reference:16-bit"  # its stage is "reference", which the export reuses when W16 is kept


def dequantized_inputs(run: Run, inputs: ModelInputs, trained_on: TrainedOn) -> ModelInputs:
    """The inputs with the base replaced by its 4-bit round trip (a folder in the stage cache)."""
    key = dequantize_key(inputs.base_files, trained_on.content(), run.versions)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"rounding {inputs.base_dir} to {trained_on.quant_type.upper()} and back, as in training")
        counts = write_dequantized_base(inputs.base_dir, staging / DEQUANTIZED_DIR, trained_on)
        meta.update(counts, what=f"{inputs.base_dir.name} as dequant({trained_on.quant_type.upper()}(W16))")

    entry = run.stage("dequant:dequantize", "dequantize", key, produce)
    return ModelInputs.hashed(entry.path / DEQUANTIZED_DIR, inputs.adapters, run.cache.hashes)


def unpacked_base(run: Run, four_bit: ModelInputs) -> Path:
    """--dequantize-base: the 16-bit folder a bitsandbytes 4-bit base stands for (in the stage cache)."""
    key = unpack_key(four_bit.base_files, run.versions)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"dequantizing the 4-bit base {four_bit.base_dir} (bitsandbytes' dequantize_4bit)")
        counts = unpack_four_bit_base(four_bit.base_dir, staging / DEQUANTIZED_DIR)
        meta.update(counts, what=f"{four_bit.base_dir.name}'s 4-bit weights dequantized")

    return run.stage("dequant:unpack", "dequantize", key, produce).path / DEQUANTIZED_DIR


def four_bit_choice(four_bit_base: Path, inputs: ModelInputs, trained_on: TrainedOn) -> QloraChoice:
    """A 4-bit-only base (--dequantize-base): its dequantized weights are exactly the ones the adapter was
    trained on, so the merge base is dequant, the unmerged reference is the model as trained, and no 16-bit
    reference exists to compare with."""
    reason = (
        f"only the 4-bit base {four_bit_base} was given (--dequantize-base): its dequantized weights, those the "
        "adapter was trained on, are the merge base; no 16-bit base, so no W16 candidate and no 16-bit reference"
    )
    decision = MergeBaseDecision("dequant", "4-bit base", trained_on, {}, reason=reason)
    return QloraChoice(decision, inputs, [], None, None, four_bit_base)


def losses_stage(
    run: Run, name: str, reference: Reference, built: BuiltGGUF, options: Any
) -> tuple[dict[str, Any], np.ndarray]:
    """One GGUF scored against `reference`, keeping its per-token losses on the evaluation tokens."""
    key = losses_key(
        quality_key(
            built.artifact.sha256, reference.key, options.gguf_device, run.versions["llama-cpp-python"]
        )
    )

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"evaluating {name}")
        metrics = evaluate_gguf(built.cached, reference, options, losses=staging / LOSSES_FILE)
        meta.update(metrics=metrics, what=f"quality and losses of {name}")

    entry = run.stage(name, "quality", key, produce)
    return entry.meta["metrics"], np.load(entry.path / LOSSES_FILE)


@dataclass
class Candidate:
    """One merge base's merged model, GGUFs, and their scores against both references."""

    label: str  # "w16" or "dequant"
    inputs: ModelInputs
    merged: MergedModel
    source: BuiltGGUF  # the F16 (or BF16) GGUF
    losses: np.ndarray  # per-token loss of the source GGUF on the evaluation tokens
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per artifact: both KLDs, the loss

    def stage_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        prefix = f"{self.label}:"
        return {n.removeprefix(prefix): s for n, s in dict(seconds).items() if n.startswith(prefix)}


@dataclass(frozen=True)
class CandidatePlan:
    """What every candidate is built and scored with."""

    name: str
    dtype: str | None
    profiles: tuple[QuantProfile, ...]
    registry: ProfileRegistry
    quality: QualityOptions


def candidate_graph(
    run: Run, label: str, inputs: ModelInputs, trained_on: TrainedOn, plan: CandidatePlan
) -> StageGraph:
    """One candidate's stages, merged, converted, quantized (cache only) and scored against both references,
    which the including graph gives as `as_trained` and `w16`; its node `candidate` is the `Candidate`.

        [dequantize ─▶] merge ─▶ convert ─▶ quantize:<P> … ─▶ quality:<P>, quality-16:<P> … ─▶ candidate
                                    └──────▶ quality:source (with the losses), quality-16:source ──┘
    """
    graph = StageGraph(inputs=("as_trained", "w16"))
    merge_needs: tuple[Stage[ModelInputs], ...] = ()
    if label == "dequant":
        merge_needs = (graph.add("dequantize", lambda _: dequantized_inputs(run, inputs, trained_on)),)

    def merge(r: Results) -> MergedModel:
        merge_inputs = r.get("dequantize", inputs)
        return merge_stage(
            run, merge_inputs, plan.dtype, f"{plan.name} ({label})", None, name=f"{label}:merge"
        )

    def convert(r: Results) -> BuiltGGUF:
        merged: MergedModel = r["merge"]
        profile = plan.registry.get(merged.result.gguf_ftype)
        key = merged_convert_key(run, merged.key, profile.ftype, plan.name)
        entry = convert_stage(run, f"{label}:convert", key, merged.path, plan.name, profile, None)
        assert not isinstance(entry, BuiltGGUF)
        return gguf_record(entry, None, profile)

    def losses(r: Results) -> tuple[dict[str, Any], np.ndarray]:
        source: BuiltGGUF = r["convert"]
        name = f"{label}:quality:{source.artifact.profile}"
        return losses_stage(run, name, r["as_trained"], source, plan.quality)

    graph.add("merge", merge, merge_needs)
    graph.add("convert", convert, ("merge",))
    graph.add("quality:source", losses, ("as_trained", "convert"))
    # In this order one stage at a time (merge-quantize without --jobs) runs them as they always ran.
    for p in plan.profiles:
        graph.add(f"quantize:{p.name}", _quantizer(run, label, p, plan), ("convert",), shared=True)
    graph.add("quality-16:source", _scorer(run, label, "w16", "quality-16", None, plan), ("w16", "convert"))
    for p in plan.profiles:
        quantized = f"quantize:{p.name}"
        graph.add(
            f"quality:{p.name}",
            _scorer(run, label, "as_trained", "quality", p, plan),
            ("as_trained", quantized),
        )
        graph.add(
            f"quality-16:{p.name}", _scorer(run, label, "w16", "quality-16", p, plan), ("w16", quantized)
        )
    built = [name for name in graph.nodes if name.startswith(("quantize:", "quality:", "quality-16:"))]
    needs: list[Stage[Any] | str] = [*merge_needs, "merge", "convert", *built]
    graph.add("candidate", _assembler(run, label, inputs, plan), needs, heavy=False)
    return graph


def _quantizer(run: Run, label: str, profile: QuantProfile, plan: CandidatePlan) -> Any:
    def quantize(r: Results) -> BuiltGGUF | None:
        source: BuiltGGUF = r["convert"]
        if profile.is_source(source.artifact.profile):
            return None  # the source itself
        name = f"{label}:quantize:{profile.name}"
        return quantize_stage(
            run, name, source.cached, source.key, profile, None, label=f"{plan.name}-{profile.name}"
        )

    return quantize


def _scorer(
    run: Run, label: str, reference: str, kind: str, profile: QuantProfile | None, plan: CandidatePlan
) -> Any:
    """One GGUF of the candidate (None: the source) scored against `reference` ("as_trained" or "w16")."""

    def score(r: Results) -> dict[str, Any] | None:
        built: BuiltGGUF | None = r["convert"] if profile is None else r[f"quantize:{profile.name}"]
        if built is None:
            return None  # a profile that is the source's own type: scored as the source
        a = built.artifact
        return score_stage(
            run, f"{label}:{kind}:{a.profile}", r[reference], built.cached, a.sha256, plan.quality
        )

    return score


def _assembler(run: Run, label: str, inputs: ModelInputs, plan: CandidatePlan) -> Any:
    """The candidate's record from its stages: one row per GGUF (the source first), and its time in all."""

    def assemble(r: Results) -> Candidate:
        metrics, losses = r["quality:source"]
        source: BuiltGGUF = r["convert"]
        candidate = Candidate(label, r.get("dequantize", inputs), r["merge"], source, losses)
        scored = [(source, metrics, r["quality-16:source"])] + [
            (r[f"quantize:{p.name}"], r[f"quality:{p.name}"], r[f"quality-16:{p.name}"])
            for p in plan.profiles
            if r[f"quantize:{p.name}"] is not None
        ]
        for built, trained, sixteen in scored:
            a = built.artifact
            for result in (trained, sixteen):
                if "error" in result:
                    raise StageError(
                        f"Scoring the {CANDIDATE_TITLES[label]} candidate's {a.profile} GGUF failed: {result['error']}"
                    )
            candidate.rows.append(
                {
                    "candidate": label,
                    "profile": a.profile,
                    "size_bytes": a.size_bytes,
                    "sha256": a.sha256,
                    "kld_as_trained": trained["mean_kld"],
                    "kld_as_trained_se": trained["mean_kld_se"],
                    "top1_as_trained": trained["top1"],
                    "kld_16bit": sixteen["mean_kld"],
                    "top1_16bit": sixteen["top1"],
                    "eval_loss": float(np.log(trained["ppl"])),
                }
            )
        # Its stages ran as the executor scheduled them, side by side with others': their sum is its cost.
        stages = candidate.stage_seconds(run.seconds)
        run.seconds[f"{label}:total"] = round(sum(s for name, s in stages.items() if name != "total"), 3)
        return candidate

    return assemble


def decide(mode: str, trained_on: TrainedOn, candidates: list[Candidate]) -> MergeBaseDecision:
    """Which merge base is kept: the lower loss for auto, else the one --merge-base forced."""
    by_label = {c.label: c for c in candidates}
    if mode == "auto":
        return decide_merge_base(by_label["w16"].losses, by_label["dequant"].losses, trained_on)
    only = by_label[mode]
    return MergeBaseDecision(
        mode,
        mode,
        trained_on,
        {mode: float(only.losses.mean())},
        tokens=len(only.losses),
        reason=f"--merge-base {mode}: the other candidate was not built",
    )


@dataclass
class QloraChoice:
    """The merge base kept for a QLoRA adapter, the inputs that merge from it, and what was measured."""

    decision: MergeBaseDecision
    kept_inputs: ModelInputs
    candidates: list[Candidate]
    as_trained: Reference | None
    w16: Reference | None
    four_bit_base: Path | None = None  # --dequantize-base: the 4-bit base the kept inputs unpack

    def second_seconds(self, seconds: dict[str, float]) -> dict[str, float]:
        """The dequant candidate's time per stage: what choosing by measurement costs over W16 alone."""
        extra = [c for c in self.candidates if c.label == "dequant"]
        return extra[0].stage_seconds(seconds) if extra and len(self.candidates) > 1 else {}

    def section(self, seconds: dict[str, float]) -> dict[str, Any]:
        """The report's and the manifest's "merge_base"."""
        references = {}
        for label, reference in (("as_trained", self.as_trained), ("16bit", self.w16)):
            if reference is not None:
                references[label] = {"cache_key": reference.key, "seconds": reference.seconds}
        rows = [row for c in self.candidates for row in c.rows]
        section = merge_base_section(self.decision.to_json(), rows, references, self.second_seconds(seconds))
        if self.four_bit_base is not None:
            section["dequantized_from"] = str(self.four_bit_base.resolve())
        return section


def qlora_graph(
    run: Run, inputs: ModelInputs, trained_on: TrainedOn, mode: str, check: bool, plan: CandidatePlan
) -> StageGraph:
    """The stages that decide a QLoRA adapter's merge base, ending in node CHOOSE (its `QloraChoice`): both
    references, then each candidate `mode` asks for (both for auto) as a sub-graph `<label>:<stage>`.
    Without the quality check only a forced merge base can be used, and nothing is measured."""
    graph = StageGraph()
    if not check:
        needs: tuple[Stage[ModelInputs], ...] = ()
        if mode == "dequant":
            needs = (graph.add("dequant:dequantize", lambda _: dequantized_inputs(run, inputs, trained_on)),)

        def forced(r: Results) -> QloraChoice:
            decision = MergeBaseDecision(
                mode, mode, trained_on, {}, reason=f"--merge-base {mode} (not measured)"
            )
            return QloraChoice(decision, r.get("dequant:dequantize", inputs), [], None, None)

        graph.add(CHOOSE, forced, needs, heavy=False)
        return graph
    quality = plan.quality

    def as_trained(_: Results) -> Reference:
        run.report(f"QLoRA adapter trained on {trained_on.describe()}: computing both references")
        return reference_stage(run, inputs, inputs.base_dir, quality, "reference:as-trained", trained_on)

    def sixteen_bit(_: Results) -> Reference:
        return reference_stage(run, inputs, inputs.base_dir, quality)

    graph.add(AS_TRAINED, as_trained)
    graph.add(SIXTEEN_BIT, sixteen_bit)
    references = {"as_trained": AS_TRAINED, "w16": SIXTEEN_BIT}
    wanted = CANDIDATES if mode == "auto" else (mode,)
    for label in wanted:
        graph.include(
            label, candidate_graph(run, label, inputs, trained_on, plan), sep=":", inputs=references
        )

    def choose(r: Results) -> QloraChoice:
        candidates: list[Candidate] = [r[f"{label}:candidate"] for label in wanted]
        decision = decide(mode, trained_on, candidates)
        chosen = next(c for c in candidates if c.label == decision.chosen)
        run.report(f"merge base: {CANDIDATE_TITLES[decision.chosen]} ({decision.reason})")
        return QloraChoice(decision, chosen.inputs, candidates, r[AS_TRAINED], r[SIXTEEN_BIT])

    graph.add(
        CHOOSE, choose, (AS_TRAINED, SIXTEEN_BIT, *(f"{label}:candidate" for label in wanted)), heavy=False
    )
    return graph


def four_bit_graph(four_bit_base: Path, inputs: ModelInputs, trained_on: TrainedOn) -> StageGraph:
    """--dequantize-base: nothing to build or measure, node CHOOSE is `four_bit_choice`."""
    choice = four_bit_choice(four_bit_base, inputs, trained_on)
    graph = StageGraph()
    graph.add(CHOOSE, lambda _: choice, heavy=False)
    return graph
