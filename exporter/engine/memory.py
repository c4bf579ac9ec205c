"""Memory budget (--max-memory): estimate the peak of the merge and of the quality check before they run.

The merge streams the base tensor by tensor, so its peak is the Python/PyTorch process itself,
the adapters (loaded whole), and a few copies of the largest tensor in flight: read in the base's
dtype and written in the output's, plus fp32 working copies for a tensor an adapter changes.
The check holds the unmerged PyTorch reference (the base in the reference dtype, the adapter on
top) and the logits of one evaluation window (window × vocabulary, fp32, a few copies); the GGUF
is evaluated in a llama.cpp child (its size plus window × vocabulary logits).
If the float32 reference does not fit and the user did not insist on float32, the reference runs
in bfloat16 (half the weights); otherwise the run stops before any work, with the estimate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from exporter.core.errors import InputError
from exporter.core.units import MiB, whole_mib
from exporter.inputs.adapter import LoraAdapter
from exporter.inputs.base_config import read_base_config
from exporter.inputs.evaldata import WINDOW
from exporter.inputs.options import QualityOptions
from exporter.inputs.safetensors_header import WRITE_QUEUE, TensorEntry, base_shard_files, read_header
from exporter.qlora.report import CANDIDATE_TITLES
from exporter.quality.streamed import BATCH_WINDOWS, streams

# Measured resident sizes of the processes before they load a model (Linux, x86-64, CPU torch).
PYTORCH_PROCESS = 240 * MiB  # python + torch + safetensors (the merge)
REFERENCE_PROCESS = 440 * MiB  # python + torch + transformers + peft (the reference)
LLAMA_CHILD = 120 * MiB  # python + llama-cpp-python, before the model is mapped
LOGIT_COPIES = 4  # logits, their fp32 copy, the numpy array and its log-softmax
FP32_WORK_COPIES = 3  # the fp32 base tensor, the LoRA product, the merged result
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    stage: str
    peak_bytes: int
    detail: str


def _entries(folder: Path) -> list[TensorEntry]:
    return [e for f in base_shard_files(folder) for e in read_header(f)]


def _adapter_targets(adapters: list[LoraAdapter]) -> set[str]:
    """Base tensor names the adapters change (from their safetensors headers)."""
    targets = set()
    for adapter in adapters:
        if adapter.weights.suffix != ".safetensors":
            continue
        for entry in read_header(adapter.weights):
            module = entry.name.removeprefix("base_model.model.").split(".lora_")[0]
            targets.add(module.replace(".base_layer", "") + ".weight")
    return targets


def estimate_merge(base_dir: Path, adapters: list[LoraAdapter], out_dtype_bytes: int = 2) -> MemoryEstimate:
    """Peak resident memory of the streaming merge."""
    entries = _entries(base_dir)
    targets = _adapter_targets(adapters)
    adapter_bytes = sum(a.weights.stat().st_size for a in adapters)
    plain = max((e.nbytes + math.prod(e.shape) * out_dtype_bytes for e in entries), default=0)
    merged = max(
        (
            e.nbytes + math.prod(e.shape) * (4 * FP32_WORK_COPIES + out_dtype_bytes)
            for e in entries
            if e.name in targets
        ),
        default=0,
    )
    in_flight = max(plain, merged)
    # The shard writer's thread holds the tensor it writes and WRITE_QUEUE more.
    writing = (WRITE_QUEUE + 1) * max((math.prod(e.shape) * out_dtype_bytes for e in entries), default=0)
    peak = PYTORCH_PROCESS + adapter_bytes + in_flight + writing
    return MemoryEstimate(
        "merge",
        peak,
        f"process {whole_mib(PYTORCH_PROCESS)} + adapters {whole_mib(adapter_bytes)} + largest tensor in flight "
        f"{whole_mib(in_flight)} + being written {whole_mib(writing)}",
    )


def _vocab_size(base_dir: Path) -> int:
    config = read_base_config(base_dir)
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000)


def estimate_reference(base_dir: Path, adapters: list[LoraAdapter], dtype: str) -> MemoryEstimate:
    """Peak resident memory of the unmerged PyTorch reference in `dtype`: streamed one decoder layer at a
    time where it can be (exporter.quality.streamed), else the whole base."""
    entries = _entries(base_dir)
    adapter_bytes = sum(a.weights.stat().st_size for a in adapters) * DTYPE_BYTES[dtype] // 4
    logits = WINDOW * _vocab_size(base_dir) * 4 * LOGIT_COPIES
    if streams(base_dir, adapters):
        largest, resident = stream_units(entries)
        held = (largest + resident) * DTYPE_BYTES[dtype]
        activations = _activations(base_dir)
        if dtype == "bfloat16":  # CPU kernels work through float32 copies: measured above the float32 peak
            activations += logits
        return MemoryEstimate(
            "check (PyTorch reference, one layer at a time)",
            REFERENCE_PROCESS + held + adapter_bytes + activations + logits,
            f"process {whole_mib(REFERENCE_PROCESS)} + largest layer, embedding or head in {dtype} "
            f"{whole_mib(held)} + adapters {whole_mib(adapter_bytes)} + activations of {BATCH_WINDOWS} windows "
            f"{whole_mib(activations)} + logits of a {WINDOW}-token window {whole_mib(logits)}",
        )
    weights = sum(math.prod(e.shape) for e in entries) * DTYPE_BYTES[dtype]
    return MemoryEstimate(
        "check (PyTorch reference)",
        REFERENCE_PROCESS + weights + adapter_bytes + logits,
        f"process {whole_mib(REFERENCE_PROCESS)} + base in {dtype} {whole_mib(weights)} + adapters {whole_mib(adapter_bytes)} "
        f"+ logits of a {WINDOW}-token window {whole_mib(logits)}",
    )


_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+)\.")


def stream_units(entries: list[TensorEntry]) -> tuple[int, int]:
    """(parameters of the largest streamed module, parameters loaded for the whole pass): a decoder layer's
    tensors stream together, the embedding and the head each on their own, the rest (norms) stay."""
    layers: dict[str, int] = {}
    largest_single, rest = 0, 0
    for entry in entries:
        count = math.prod(entry.shape)
        match = _LAYER_PREFIX.match(entry.name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), 0) + count
        elif len(entry.shape) == 2:
            largest_single = max(largest_single, count)  # the embedding, the head
        else:
            rest += count
    return max([largest_single, *layers.values()]), rest


def _activations(base_dir: Path) -> int:
    """A batch of windows going through a layer and out of the decoder: measured on SmolLM2-135M to grow with
    the vocabulary as well as the layer's width (4 windows: 1,000 MiB peak against this estimate's 1,013)."""
    config = read_base_config(base_dir)
    text = config.get("text_config", config)
    hidden = int(text.get("hidden_size") or 4096)
    intermediate = int(text.get("intermediate_size") or 4 * hidden)
    heads = int(text.get("num_attention_heads") or 32)
    tokens = BATCH_WINDOWS * WINDOW
    per_token = _vocab_size(base_dir) + 8 * hidden + 4 * intermediate
    return tokens * 4 * per_token + BATCH_WINDOWS * heads * WINDOW * WINDOW * 4 * 2


def estimate_gguf_eval(base_dir: Path, gguf_bytes: int) -> MemoryEstimate:
    """Peak resident memory of a llama.cpp child scoring a GGUF of `gguf_bytes`."""
    logits = WINDOW * _vocab_size(base_dir) * 4 * 2
    return MemoryEstimate(
        "check (GGUF evaluation)",
        LLAMA_CHILD + gguf_bytes + logits,
        f"process {whole_mib(LLAMA_CHILD)} + GGUF {whole_mib(gguf_bytes)} + logits {whole_mib(logits)}",
    )


def _over(estimate: MemoryEstimate, limit: int, fix: str) -> InputError:
    return InputError(
        f"--max-memory {whole_mib(limit)} is too little: the {estimate.stage} needs about {whole_mib(estimate.peak_bytes)} "
        f"({estimate.detail}). {fix}"
    )


def fit_merge(
    base_dir: Path, adapters: list[LoraAdapter], limit: int, out_dtype_bytes: int = 2
) -> MemoryEstimate:
    """The merge's estimate, or an error before any work if it exceeds `limit`."""
    estimate = estimate_merge(base_dir, adapters, out_dtype_bytes)
    if estimate.peak_bytes > limit:
        raise _over(
            estimate,
            limit,
            f"The merge streams {base_dir} one tensor at a time and cannot use less; raise --max-memory "
            "or run on a machine with more memory.",
        )
    return estimate


def fit_check(
    base_dir: Path,
    adapters: list[LoraAdapter],
    options: QualityOptions,
    limit: int,
    dtype_fixed: bool,
    largest_gguf_bytes: int,
) -> tuple[QualityOptions, list[MemoryEstimate]]:
    """Quality options that keep the check under `limit` (bfloat16 reference if float32 is too big and the user
    left the dtype open), with the estimates; or an error before any work."""
    reference = estimate_reference(base_dir, adapters, options.reference_dtype)
    streamed = streams(base_dir, adapters)  # a streamed bfloat16 reference saves nothing
    if (
        reference.peak_bytes > limit
        and not dtype_fixed
        and options.reference_dtype == "float32"
        and not streamed
    ):
        # Even if bfloat16 does not fit either, its estimate is the one to report.
        options = replace(options, reference_dtype="bfloat16")
        reference = estimate_reference(base_dir, adapters, "bfloat16")
    if reference.peak_bytes > limit:
        fix = (
            "Pass --reference-dtype bfloat16 (half the weights), raise --max-memory, or skip the check with --no-check."
            if options.reference_dtype == "float32" and not streamed
            else "Raise --max-memory, or skip the check with --no-check."
        )
        raise _over(reference, limit, fix)
    evaluation = estimate_gguf_eval(base_dir, largest_gguf_bytes)
    if evaluation.peak_bytes > limit:
        raise _over(evaluation, limit, "Raise --max-memory, or skip the check with --no-check.")
    return options, [reference, evaluation]


# Estimates of the stages a batch schedules side by side (the converter and the quantizer hold about one
# tensor at a time in float32, in and out, beside their process).
CONVERT_PROCESS = 400 * MiB  # python + torch + llama.cpp's converter
CONVERT_COPIES = 3  # the tensor read, its float32 copy, the one written
QUANTIZE_COPIES = 3  # the float32 tensor, its quantized output, imatrix/working rows


def stage_kind(stage: str) -> str:
    """What a stage does, from its name: quantize:Q8_0 -> quantize, and a QLoRA merge candidate's stage as
    the export's own (w16:merge -> merge, dequant:quality-16:F16 -> quality)."""
    label, _, rest = stage.partition(":")
    kind = (rest if label in CANDIDATE_TITLES and rest else stage).split(":")[0]
    return "quality" if kind == "quality-16" else kind


def estimate_stage(
    stage: str, base_dir: Path, adapters: list[LoraAdapter], reference_dtype: str = "float32"
) -> int:
    """Peak resident bytes of one stage of an export graph, by the stage's name (exporter/core/faults.py lists
    them; a QLoRA merge candidate's stages are those of the export, its dequantize rounds one shard at a time)."""
    kind = stage_kind(stage)
    entries = _entries(base_dir)
    largest = max((math.prod(e.shape) for e in entries), default=0)
    sixteen_bit = sum(math.prod(e.shape) for e in entries) * 2
    if kind == "merge":
        return estimate_merge(base_dir, adapters).peak_bytes
    if kind in ("convert", "convert-base"):
        return CONVERT_PROCESS + largest * 4 * CONVERT_COPIES
    if kind == "quantize":
        return LLAMA_CHILD + largest * 4 * QUANTIZE_COPIES
    if kind == "lora":
        return PYTORCH_PROCESS + 3 * sum(a.weights.stat().st_size for a in adapters)
    if kind == "reference":
        return estimate_reference(base_dir, adapters, reference_dtype).peak_bytes
    if kind in ("quality", "merged", "imatrix"):
        return estimate_gguf_eval(base_dir, sixteen_bit).peak_bytes
    if kind == "dequantize":  # a whole shard loaded, the tensor being rounded in float32
        shard = max((f.stat().st_size for f in base_shard_files(base_dir)), default=0)
        return PYTORCH_PROCESS + 2 * shard + largest * 4 * FP32_WORK_COPIES
    return PYTORCH_PROCESS  # a stage this table does not know: at least a process


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """Memory this machine can give now (MemAvailable), or its total where that is not known."""
    import os

    return mem_available() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
