"""The quality check: every artifact against the unmerged reference (base + adapter in PyTorch).

    eval data ──HF tokenizer──▶ token ids ──▶ PEFT model (base + adapters) ──▶ reference (cached)
                                          └─▶ each GGUF in a llama.cpp child ──▶ KLD, top-1, ΔPPL, …

The base model without the adapter is scored the same way, as a floor: "adapter effect kept" is
1 − KLD(ref‖artifact) / KLD(ref‖base), the share of the fine-tune's change that survived export.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.llama_runtime import score_gguf
from converters.metrics import (
    compare_rows,
    greedy_agreement,
    greedy_divergence,
    greedy_summary,
    log_softmax,
    reference_rows,
    summarize,
)
from exporter.core.errors import InputError
from exporter.inputs.adapter import LoraAdapter, tokenizer_source
from exporter.inputs.evaldata import EvalData
from exporter.inputs.options import GATE_KEYS, GateOverrides, QualityOptions
from exporter.inputs.tokenizer_files import saved_vocab_rows, special_token_ids
from exporter.inputs.trained_on import TrainedOn
from exporter.inputs.vision import auto_model_class
from exporter.quality.greedy import base_top_tokens, reference_greedy
from exporter.quality.streamed import (
    StreamedWeights,
    empty_base,
    load_adapter_tensors,
    stop_ids,
    stored_tensors,
    stream_layers,
    streams,
    unstreamable,
    window_log_probs,
)
from quant_profiles import QuantProfile


@dataclass
class Reference:
    """The unmerged model's compact log-probs on the eval data, its greedy answers, and the base floor."""

    file: Path
    eval: EvalData
    nll: np.ndarray
    greedy: list[list[int]]
    greedy_how: str  # how the greedy continuations were found, for the report
    base_metrics: dict[str, Any]
    key: str
    seconds: float
    cached: bool


@dataclass(frozen=True)
class GateResult:
    profile: str
    gate: str
    limit: float
    value: float | None
    passed: bool


UNQUANTIZED_LABELS = ("F16", "BF16", "F32")


# The 16-bit floor explains an unquantized GGUF's distance when it is at least this share of it; what the
# conversion and runtime add beyond DIFFERENT_MODEL (mean KLD) is another model, not arithmetic.
ROUNDING_SHARE = 0.5
DIFFERENT_MODEL = 1e-2


def gate_diagnosis(label: str, metrics: dict[str, Any] | None = None) -> str | None:
    """What a failed gate on this artifact points at: an unquantized GGUF is the merge, the rounding to 16
    bits and the conversion alone; its metrics' "rounding_floor" (quality/floor.py) tells them apart."""
    if label not in UNQUANTIZED_LABELS:
        return None
    floor = (metrics or {}).get("rounding_floor")
    if not isinstance(floor, dict) or "mean_kld" not in floor:
        return (
            f"The {label} GGUF is not quantized, so its distance from the unmerged model comes from the merge, "
            "the rounding to 16 bits, the conversion or the way the base was read (a config field misread, such "
            "as another transformers version's rope settings), not from quantization. Fix that first: every "
            "quantized file inherits it."
        )
    total, rounding = (metrics or {}).get("mean_kld") or 0.0, floor["mean_kld"]
    bits = 32 if label == "F32" else 16
    split = (
        f"The merged model rounded to {bits} bits as the {label} GGUF stores it (scored in PyTorch) is {rounding:.3g} "
        f"mean KLD from the unmerged model; the {label} GGUF is {total:.3g}, so the conversion and llama.cpp's "
        f"runtime add {max(total - rounding, 0.0):.3g}."
    )
    if total > 0 and rounding >= ROUNDING_SHARE * total:
        return (
            f"{split} Most of it is the rounding: the merge and the conversion are faithful, and this fine-tune's "
            f"merged weights do not survive {bits}-bit rounding (an adapter that rewrites whole matrices, or values "
            "near the type's limits). Every quantized file starts from this floor"
            + (
                ": export again with --dtype float32 for a 32-bit master GGUF (F32), which the profiles then "
                "quantize from and which is the exactness reference in place of this one."
                if bits == 16
                else "."
            )
        )
    if total - rounding >= DIFFERENT_MODEL:
        return (
            f"{split} That much is another model, not arithmetic: llama.cpp computes some setting of the config "
            "differently from transformers (a field its graph does not implement, rope settings, a tokenizer read "
            "differently). Fix that first: every quantized file inherits it."
        )
    return (
        f"{split} The merge and the rounding are faithful; this fine-tune is sensitive to llama.cpp's own "
        "arithmetic (its kernels round activations and accumulate in other orders than PyTorch), which the "
        "quantized files inherit. No export setting changes that; raise the F16 gate if the figure is acceptable."
    )


@dataclass
class ArtifactQuality:
    label: str  # profile name, or "base (no adapter)"
    path: Path | None
    size_bytes: int
    bits_per_weight: float | None
    metrics: dict[str, Any]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def _reference_model(
    base_dir: Path, adapters: list[LoraAdapter], options: QualityOptions, trained_on: TrainedOn | None = None
) -> tuple[Any, StreamedWeights | None]:
    """The unmerged model: streamed from the shards one layer at a time where it can be (its weights then
    read in the hooks of `streamed`), else the whole base loaded in the reference dtype."""
    import torch

    from exporter.inputs.dialects import quiet_transformers

    quiet_transformers()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if options.device == "mps" and not torch.backends.mps.is_available():
        raise InputError(
            "--reference-device mps was asked for, but this PyTorch has no Metal (MPS) support here."
        )
    if streams(base_dir, adapters):
        weights = StreamedWeights(
            stored_tensors(base_dir), {}, dtypes[options.reference_dtype], options.device
        )
        model = empty_base(base_dir, options.trust_remote_code)
        weights.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        _as_trained_vocabulary(model, adapters, base_dir)
        if trained_on is not None:  # the base as the adapter was trained on it, rounded as each layer is read
            from exporter.qlora.round_trip import quantized_weight_names

            weights.rounded, weights.trained_on = quantized_weight_names(base_dir, trained_on), trained_on
        peft_model = with_adapters(model, adapters, streamed=True)
        if unstreamable(peft_model, weights) is None:
            stream_layers(peft_model, weights)
            return peft_model.eval(), weights
    model = whole_base(base_dir, dtypes[options.reference_dtype], options.trust_remote_code)
    _as_trained_vocabulary(model, adapters, base_dir)
    if trained_on is not None:
        from exporter.qlora.round_trip import round_to_training_base

        round_to_training_base(model, base_dir, trained_on)
    return with_adapters(model, adapters, streamed=False).to(options.device).eval(), None


def whole_base(base_dir: Path, dtype: Any, trust_remote_code: bool) -> Any:
    """The whole base in memory, for what cannot be streamed."""
    return auto_model_class(base_dir).from_pretrained(
        str(base_dir), dtype=dtype, trust_remote_code=trust_remote_code
    )


def with_adapters(model: Any, adapters: list[LoraAdapter], streamed: bool) -> Any:
    """PEFT's model of `adapters` on `model` (several or weighted LoRA adapters combined by concatenation).
    `streamed`: the base is on the meta device, and the adapters' tensors are read in by hand."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        model, str(adapters[0].path), adapter_name="a0", low_cpu_mem_usage=streamed
    )
    for index, adapter in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(str(adapter.path), adapter_name=f"a{index}", low_cpu_mem_usage=streamed)
    if streamed:
        load_adapter_tensors(peft_model, adapters)
    if len(adapters) > 1 or adapters[0].weight != 1.0:
        if any(a.peft_type != "LORA" for a in adapters):
            raise InputError(
                "The quality reference for several or weighted adapters supports LoRA adapters only."
            )
        peft_model.add_weighted_adapter(
            [f"a{i}" for i in range(len(adapters))],
            [a.weight for a in adapters],
            "combined",
            combination_type="cat",
        )
        peft_model.set_adapter("combined")
    return peft_model


def _as_trained_vocabulary(model: Any, adapters: list[LoraAdapter], base_dir: Path) -> None:
    """The base as its trainer had it: embeddings resized to the rows the adapter saved (the adapter then
    loads its own rows over them), stopping where the adapter's tokenizer ends a turn."""
    rows = saved_vocab_rows(adapters[0])
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    eos = special_token_ids(tokenizer_source(adapters, base_dir)).get("eos")
    stops = stop_ids(model)
    if eos is not None and eos not in stops:
        model.generation_config.eos_token_id = [*stops, eos]


def compute_reference(
    base_dir: Path,
    adapters: list[LoraAdapter],
    eval_data: EvalData,
    options: QualityOptions,
    trained_on: TrainedOn | None = None,
    drafter: Callable[[], list[list[int]] | None] | None = None,
) -> tuple[dict[str, np.ndarray], list[list[int]], dict[str, Any], str]:
    """The reference's compact log-probs, its greedy continuations, the base's metrics against it (its
    greedy agreement read teacher-forced on the reference's continuations), and how the continuations were
    found. `drafter`: draft continuations (a 16-bit GGUF's, from llama.cpp), asked for only where the
    reference streams, whose tokens it then confirms rather than decoding token by token."""
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    drafts = drafter() if drafter is not None and eval_data.prompts and streams(base_dir, adapters) else None
    model, streamed = _reference_model(base_dir, adapters, options, trained_on)
    parts: dict[str, list[np.ndarray]] = {"idx": [], "lp": [], "nll": []}
    base_parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top": [], "nll": []}
    with torch.no_grad():
        windows = _window_log_probs(model, streamed is not None, eval_data.sequences, options.device)
        for sequence, (reference_lp, base_lp) in zip(eval_data.sequences, windows, strict=True):
            rows = reference_rows(reference_lp, np.asarray(sequence))
            for key, value in rows.items():
                parts[key].append(value)
            for key, value in compare_rows(base_lp, np.asarray(sequence), rows["idx"], rows["lp"]).items():
                base_parts[key].append(value)
        stops = set(stop_ids(model))
        greedy, how = reference_greedy(model, streamed is not None, eval_data.prompts, options, drafts, stops)
        base_divergence = [
            greedy_divergence(top, len(prompt), continuation, options.max_new_tokens, stops)
            for prompt, continuation, top in zip(
                eval_data.prompts,
                greedy,
                base_top_tokens(model, streamed is not None, eval_data.prompts, greedy, options.device),
                strict=True,
            )
        ]
    arrays = {key: np.concatenate(values) for key, values in parts.items()}
    base = {key: np.concatenate(values) for key, values in base_parts.items()}
    base_metrics = summarize(base["kld"], base["same_top"], base["nll"], arrays["nll"])
    base_metrics.update(greedy_summary(base_divergence))
    base_metrics["adapter_effect_kept"] = 0.0
    return arrays, greedy, base_metrics, how


def _window_log_probs(
    model: Any, streamed: bool, sequences: tuple[tuple[int, ...], ...], device: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each window's log-probabilities with the adapter and without it: all windows through each streamed
    layer together, or window by window through the whole model."""
    if streamed:
        yield from window_log_probs(model, sequences, device)
        return
    import torch

    for sequence in sequences:
        ids = torch.tensor([sequence], device=device)
        adapted = log_softmax(model(input_ids=ids).logits[0].float().cpu().numpy())
        with model.disable_adapter():
            base = log_softmax(model(input_ids=ids).logits[0].float().cpu().numpy())
        yield adapted, base


def evaluate_gguf(
    gguf: Path,
    reference: Reference,
    options: QualityOptions,
    lora: Path | None = None,
    losses: Path | None = None,
    held_out: list[int] | None = None,
) -> dict[str, Any]:
    """Metrics of one GGUF (with `lora`: base GGUF + runtime GGUF LoRA) against the reference; with
    `losses`, its per-token loss is saved there too (.npy); with `held_out` (windows of the evaluation
    data a fit search did not use), also the mean KLD and top-1 agreement on those windows alone.

    The GGUF runs in a llama.cpp child process.
    """
    with tempfile.TemporaryDirectory(prefix="edge-export-score-") as scratch:
        output = Path(scratch) / "scores.npz"
        result = score_gguf(
            gguf,
            reference.eval.sequences,
            reference.file,
            output,
            reference.eval.prompts,
            options.max_new_tokens,
            options.threads,
            options.gguf_device,
            lora,
        )
        scores = np.load(output)
        metrics = summarize(scores["kld"], scores["same_top"], scores["nll"], reference.nll)
        if losses is not None:
            np.save(losses, scores["nll"])
        if held_out is not None:
            mask = window_mask(reference, held_out)
            metrics["held_out_mean_kld"] = float(np.mean(scores["kld"][mask]))
            metrics["held_out_top1"] = float(np.mean(scores["same_top"][mask]))
            metrics["held_out_tokens"] = int(mask.sum())
    metrics.update(greedy_agreement(reference.greedy, result["greedy"]))
    floor = reference.base_metrics["mean_kld"]
    metrics["adapter_effect_kept"] = 1.0 - metrics["mean_kld"] / floor if floor > 0 else None
    metrics["eval_tokens_per_s"] = (
        result["tokens"] / result["eval_seconds"] if result["eval_seconds"] else None
    )
    metrics["generate_tokens_per_s"] = (
        result["generated_tokens"] / result["generate_seconds"] if result["generate_seconds"] else None
    )
    return metrics


def window_mask(reference: Reference, windows: list[int]) -> np.ndarray:
    """The scored positions that belong to `windows` of the evaluation data."""
    lengths = [len(s) - 1 for s in reference.eval.sequences]
    chosen = set(windows)
    return np.concatenate([np.full(n, i in chosen) for i, n in enumerate(lengths)])


# The gates also applied to the answers about images (a vision-language export's image rows): the mean KLD.
# Their top-1 is reported, not gated: the answers hold tens of tokens, where one near-tie that flips moves
# top-1 by a few percent (1.7 % on the built-in rows) and a 99 % gate would judge noise.
IMAGE_GATES = ("max_mean_kld",)


def apply_gates(
    profile: QuantProfile, metrics: dict[str, Any], overrides: GateOverrides | None
) -> list[GateResult]:
    """The profile's gates (from its file), with --gate overrides, checked against the metrics."""
    limits: dict[str, float] = {
        "max_mean_kld": profile.gates.max_mean_kld,
        "min_top1": profile.gates.min_top1,
    }
    for (target, key), number in (overrides if overrides is not None else {}).items():
        if target is None or target == profile.name.upper():
            limits[key] = number
    results = []
    for key, limit in limits.items():
        value = metrics.get(GATE_KEYS[key])
        passed = value is not None and (value <= limit if key.startswith("max_") else value >= limit)
        results.append(GateResult(profile.name, key, limit, value, passed))
        if key in IMAGE_GATES and ("image_rows" in metrics or "image_error" in metrics):
            value = metrics.get(f"image_{GATE_KEYS[key]}")
            passed = value is not None and (value <= limit if key.startswith("max_") else value >= limit)
            results.append(GateResult(profile.name, f"{key} (images)", limit, value, passed))
    return results


@dataclass
class PairQuality:
    """One adapter on one profile: as a runtime LoRA on the quantized base, and, when built, merged."""

    adapter: str
    profile: str
    runtime: ArtifactQuality  # size: base + adapter, what one deployment needs on disk
    merged: ArtifactQuality | None = None

    @property
    def passed(self) -> bool:
        return self.runtime.passed
