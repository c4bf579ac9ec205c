"""reference and quality: the unmerged model's log-probs on the evaluation data (PyTorch, cached like
any stage), and each GGUF (or base GGUF + GGUF LoRA) scored against them in a llama.cpp child."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.metrics import TOP_K
from exporter.core.errors import StageError
from exporter.engine.run import Run
from exporter.engine.stage_keys import floor_key, quality_key, reference_key
from exporter.inputs.evaldata import EvalData, load_eval_data, token_budget
from exporter.inputs.options import QualityOptions, RunOptions
from exporter.inputs.records import ModelInputs
from exporter.inputs.safetensors_header import stored_weights
from exporter.inputs.tokenizer import load_tokenizer
from exporter.quality.greedy import DECODED
from exporter.quality.reference import (
    ArtifactQuality,
    GateResult,
    Reference,
    apply_gates,
    compute_reference,
    evaluate_gguf,
)
from exporter.quality.report import REPORT_FILES, report_data, write_reports
from quant_profiles import QuantProfile

REFERENCE_FILE = "reference.npz"


def reference_stage(
    run: Run,
    inputs: ModelInputs,
    tokenizer_dir: Path,
    options: QualityOptions,
    name: str = "reference",
    trained_on: Any = None,
    draft: Path | None = None,
) -> Reference:
    """The reference for these inputs and this evaluation data, computed once and cached; with
    `trained_on` (exporter.inputs.trained_on.TrainedOn), the model as trained: its base rounded to 4 bits.
    `draft`: a 16-bit GGUF of the merged model whose greedy continuations (llama.cpp) the reference
    confirms instead of decoding its own token by token (the same tokens; the key does not depend on it)."""
    eval_data = load_eval_data(options.eval_data, load_tokenizer(tokenizer_dir), n_prompts=options.n_prompts)
    eval_data = eval_data.within(
        token_budget(options.eval_tokens, stored_weights(inputs.base_dir), eval_data.n_scored)
    )
    key = reference_key(
        inputs.content(),
        eval_data.fingerprint(),
        TOP_K,
        options.reference_dtype,
        options.max_new_tokens,
        run.versions,
        None if trained_on is None else trained_on.content(),
    )

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        model = "unmerged reference" if trained_on is None else "reference as trained (4-bit base)"
        run.report(f"computing the {model} on {eval_data.n_scored} tokens of {eval_data.source}")
        start = time.perf_counter()
        drafter = None if draft is None else (lambda: _drafts(run, draft, eval_data, options))
        arrays, greedy, base_metrics, how = compute_reference(
            inputs.base_dir, list(inputs.adapters), eval_data, options, trained_on, drafter
        )
        np.savez(staging / REFERENCE_FILE, idx=arrays["idx"], lp=arrays["lp"], nll=arrays["nll"])
        meta.update(
            greedy=greedy,
            greedy_how=how,
            base_metrics=base_metrics,
            seconds=round(time.perf_counter() - start, 3),
            eval_source=eval_data.source,
            what="unmerged model's log-probs",
        )

    entry = run.stage(name, "reference", key, produce)
    meta = entry.meta
    cached = name in run.reused
    run.report(
        f"{name}: {eval_data.n_scored} tokens from {eval_data.source}"
        + (" (cached)" if cached else f" ({meta['seconds']:.0f}s)")
    )
    with np.load(entry.path / REFERENCE_FILE) as data:
        nll = data["nll"]
    return Reference(
        entry.path / REFERENCE_FILE,
        eval_data,
        nll,
        meta["greedy"],
        meta.get("greedy_how", DECODED),  # entries cached before the drafts were kept with it
        meta["base_metrics"],
        key,
        meta["seconds"],
        cached=cached,
    )


def _drafts(run: Run, gguf: Path, eval_data: EvalData, options: QualityOptions) -> list[list[int]] | None:
    """The 16-bit GGUF's greedy continuations of the evaluation prompts, as drafts; None (the reference
    then decodes its own) when llama.cpp fails on it: the quality stage of that file reports why."""
    from converters.llama_runtime import greedy_generate

    run.report(f"drafting greedy answers with {gguf.name}")
    n_ctx = max(len(p) for p in eval_data.prompts) + options.max_new_tokens
    try:
        return greedy_generate(gguf, eval_data.prompts, options.max_new_tokens, n_ctx, options.threads)
    except StageError as exc:
        run.report(f"drafting with {gguf.name} failed ({exc}); the reference decodes its own answers")
        return None


def score_stage(
    run: Run,
    name: str,
    reference: Reference,
    gguf: Path,
    sha256: str,
    options: QualityOptions,
    lora: tuple[Path, str] | None = None,
    held_out: list[int] | None = None,
) -> dict[str, Any]:
    """The metrics of one GGUF (with `lora`: base GGUF + GGUF LoRA, each with its sha256) against the
    reference (with `held_out` windows: also on those alone). An evaluation that crashes gives
    {"error": …} for that artifact alone (never cached)."""
    key = quality_key(
        sha256,
        reference.key,
        options.gguf_device,
        run.versions["llama-cpp-python"],
        lora=lora[1] if lora else None,
        held_out=held_out,
    )
    what = gguf.name + (f" + {lora[0].name}" if lora else "")

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"evaluating {what}")
        metrics = evaluate_gguf(gguf, reference, options, lora=lora[0] if lora else None, held_out=held_out)
        meta.update(metrics=metrics, what=f"quality of {what}")

    try:
        entry = run.stage(name, "quality", key, produce)
    except StageError as exc:
        run.report(f"{name}: evaluation failed: {exc}")
        return {"error": str(exc)}
    metrics: dict[str, Any] = entry.meta["metrics"]
    return metrics


def floor_stage(
    run: Run, merged_key: str, merged_dir: Path, reference: Reference, options: QualityOptions
) -> dict[str, Any]:
    """The 16-bit floor (exporter/quality/floor.py) of a merged folder, cached; {"skipped": why} where its
    weights are gone (released by an earlier run, whose floor was not needed then)."""
    from exporter.quality.floor import rounding_floor

    key = floor_key(merged_key, reference.key, run.versions)
    cached = run.cache.lookup("floor", key)
    if cached is None and not list(merged_dir.glob("*.safetensors")):
        return {
            "skipped": f"{merged_dir} holds no weights (released by an earlier run); export with --keep-merged"
        }

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(
            "scoring the merged model rounded to 16 bits against the unmerged reference (the 16-bit floor)"
        )
        meta.update(
            metrics=rounding_floor(merged_dir, reference, options), what="16-bit floor of the merged model"
        )

    metrics: dict[str, Any] = run.stage("floor", "floor", key, produce).meta["metrics"]
    return metrics


def judged(
    label: str,
    path: Path | None,
    size_bytes: int,
    bits_per_weight: float | None,
    metrics: dict[str, Any],
    profile: QuantProfile,
    options: QualityOptions,
) -> ArtifactQuality:
    """An artifact's metrics with its profile's gates (and --gate overrides) applied; an evaluation that
    failed fails the "evaluation" gate."""
    gates = (
        [GateResult(label, "evaluation", 0.0, None, False)]
        if "error" in metrics
        else apply_gates(profile, metrics, options.gate_overrides)
    )
    return ArtifactQuality(label, path, size_bytes, bits_per_weight, metrics, gates)


@dataclass
class QualitySummary:
    """Every artifact judged against one reference, the base floor, and the reports written."""

    items: list[ArtifactQuality]
    floor: ArtifactQuality
    reports: list[Path]
    reference_seconds: float
    reference_cached: bool
    context: int | None = None  # --context: where the rows' memory is given

    @property
    def passed(self) -> bool:
        return all(item.passed for item in self.items)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for item in self.items for g in item.gates if not g.passed]


def write_quality_report(
    run: Run,
    name: str,
    inputs: ModelInputs,
    reference: Reference,
    options: QualityOptions,
    items: list[ArtifactQuality],
    extra: dict[str, Any] | None = None,
) -> QualitySummary:
    """report.json, report.md and quality.png for artifacts judged against one reference (`extra`:
    further report sections, such as a QLoRA export's merge base)."""
    floor = ArtifactQuality("base (no adapter)", None, 0, None, reference.base_metrics)
    sources = {
        "tools": run.versions,
        "base": str(inputs.base_dir.resolve()),
        "adapters": [{"path": str(a.folder.resolve()), "weight": a.weight} for a in inputs.adapters],
    }
    data = report_data(name, run.out, reference, options, items, floor, sources)
    data.update(extra or {})
    for report_file in REPORT_FILES:
        run.guard.claim(run.out / report_file)
    reports = write_reports(run.out, data)
    return QualitySummary(items, floor, reports, reference.seconds, reference.cached, options.context)


def reference_for(inputs: ModelInputs, tokenizer_dir: Path, options: QualityOptions) -> Reference:
    """The reference outside a command (benches, tests): from the stage cache, or computed into it."""
    with (
        tempfile.TemporaryDirectory(prefix="edge-export-reference-") as scratch,
        Run.open(Path(scratch), RunOptions(), lock=False) as run,
    ):
        return reference_stage(run, inputs, tokenizer_dir, options)
