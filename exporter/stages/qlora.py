"""QLoRA's merge candidates: W16 + ΔW and dequant(Q4(W16)) + ΔW, each merged, converted, quantized and
scored against the model as trained (4-bit base + adapter) and the 16-bit reference; then the choice.

    base ──dequantize──▶ dequant(Q4(W16)) base ─┐
      └───────────────────────────────────────┴─▶ merge ─▶ convert ─▶ quantize:<P> … ─▶ scores, losses

Candidates live in the stage cache only: the export links the kept one into the output (its stages are
then reused), so the other candidate's files never reach the output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import StageError
from exporter.options import QualityOptions
from exporter.qlora import (
    MergeBaseDecision,
    TrainedOn,
    decide_merge_base,
    unpack_four_bit_base,
    write_dequantized_base,
)
from exporter.qlora_report import CANDIDATE_TITLES, merge_base_section
from exporter.quality import Reference, evaluate_gguf
from exporter.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.run import Run
from exporter.stage_keys import convert_key, dequantize_key, losses_key, quality_key, unpack_key
from exporter.stages.gguf import convert_stage, gguf_record, quantize_stage
from exporter.stages.merge import merge_stage
from exporter.stages.quality import reference_stage, score_stage
from quant_profiles import ProfileRegistry, QuantProfile

DEQUANTIZED_DIR = "base"
LOSSES_FILE = "losses.npy"
CANDIDATES = ("w16", "dequant")


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
        return {name.removeprefix(prefix): s for name, s in seconds.items() if name.startswith(prefix)}


@dataclass(frozen=True)
class CandidatePlan:
    """What every candidate is built and scored with."""

    name: str
    dtype: str | None
    profiles: tuple[QuantProfile, ...]
    registry: ProfileRegistry
    quality: QualityOptions
    as_trained: Reference
    w16: Reference


def build_candidate(run: Run, label: str, inputs: ModelInputs, plan: CandidatePlan) -> Candidate:
    """Merge, convert, quantize (cache only) and score one candidate against both references."""
    merged = merge_stage(run, inputs, plan.dtype, f"{plan.name} ({label})", None, name=f"{label}:merge")
    profile = plan.registry.get(merged.result.gguf_ftype)
    key = convert_key(merged.key, run.vendored.commit, profile.ftype.lower(), plan.name)
    entry = convert_stage(run, f"{label}:convert", key, merged.path, plan.name, profile, None)
    assert not isinstance(entry, BuiltGGUF)
    source = gguf_record(entry, None, profile)
    metrics, losses = losses_stage(
        run, f"{label}:quality:{profile.name}", plan.as_trained, source, plan.quality
    )
    candidate = Candidate(label, inputs, merged, source, losses)
    builts = [source] + [
        quantize_stage(
            run,
            f"{label}:quantize:{p.name}",
            source.cached,
            source.key,
            p,
            None,
            label=f"{plan.name}-{p.name}",
        )
        for p in plan.profiles
        if not p.is_source(source.artifact.profile)
    ]
    for built in builts:
        a = built.artifact
        trained = (
            metrics
            if built is source
            else score_stage(
                run, f"{label}:quality:{a.profile}", plan.as_trained, built.cached, a.sha256, plan.quality
            )
        )
        sixteen = score_stage(
            run, f"{label}:quality-16:{a.profile}", plan.w16, built.cached, a.sha256, plan.quality
        )
        for scored in (trained, sixteen):
            if "error" in scored:
                raise StageError(
                    f"Scoring the {CANDIDATE_TITLES[label]} candidate's {a.profile} GGUF failed: {scored['error']}"
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
    return candidate


def choose_merge_base(
    run: Run, inputs: ModelInputs, trained_on: TrainedOn, mode: str, plan: CandidatePlan
) -> tuple[MergeBaseDecision, list[Candidate]]:
    """Build the candidates `mode` asks for (both for auto) and decide which merge base is kept."""
    wanted = CANDIDATES if mode == "auto" else (mode,)
    candidates = []
    for label in wanted:
        start = time.perf_counter()
        candidate_inputs = inputs if label == "w16" else dequantized_inputs(run, inputs, trained_on)
        candidates.append(build_candidate(run, label, candidate_inputs, plan))
        run.seconds[f"{label}:total"] = round(time.perf_counter() - start, 3)
    by_label = {c.label: c for c in candidates}
    if mode == "auto":
        decision = decide_merge_base(by_label["w16"].losses, by_label["dequant"].losses, trained_on)
    else:
        only = by_label[mode]
        decision = MergeBaseDecision(
            mode,
            mode,
            trained_on,
            {mode: float(only.losses.mean())},
            tokens=len(only.losses),
            reason=f"--merge-base {mode}: the other candidate was not built",
        )
    return decision, candidates


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


def qlora_choice(
    run: Run, inputs: ModelInputs, trained_on: TrainedOn, mode: str, check: bool, plan: dict[str, Any]
) -> QloraChoice:
    """Decide the merge base for a QLoRA adapter (`plan`: CandidatePlan's fields but the references).
    Without the quality check only a forced merge base can be used, and nothing is measured."""
    if not check:
        kept = inputs if mode == "w16" else dequantized_inputs(run, inputs, trained_on)
        decision = MergeBaseDecision(mode, mode, trained_on, {}, reason=f"--merge-base {mode} (not measured)")
        return QloraChoice(decision, kept, [], None, None)
    quality: QualityOptions = plan["quality"]
    run.report(f"QLoRA adapter trained on {trained_on.describe()}: computing both references")
    as_trained = reference_stage(run, inputs, inputs.base_dir, quality, "reference:as-trained", trained_on)
    w16 = reference_stage(run, inputs, inputs.base_dir, quality)
    decision, candidates = choose_merge_base(
        run, inputs, trained_on, mode, CandidatePlan(**plan, as_trained=as_trained, w16=w16)
    )
    chosen = next(c for c in candidates if c.label == decision.chosen)
    run.report(f"merge base: {CANDIDATE_TITLES[decision.chosen]} ({decision.reason})")
    return QloraChoice(decision, chosen.inputs, candidates, as_trained, w16)
