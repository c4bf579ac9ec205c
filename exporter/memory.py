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

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from exporter.adapter import LoraAdapter
from exporter.errors import InputError
from exporter.evaldata import WINDOW
from exporter.quality import QualityOptions
from exporter.safetensors_header import WRITE_QUEUE, TensorEntry, base_shard_files, read_header

MiB = 1 << 20
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
        f"process {_mib(PYTORCH_PROCESS)} + adapters {_mib(adapter_bytes)} + largest tensor in flight "
        f"{_mib(in_flight)} + being written {_mib(writing)}",
    )


def _vocab_size(base_dir: Path) -> int:
    config = json.loads((base_dir / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 32000)


def estimate_reference(base_dir: Path, adapters: list[LoraAdapter], dtype: str) -> MemoryEstimate:
    """Peak resident memory of the unmerged PyTorch reference in `dtype`."""
    params = sum(math.prod(e.shape) for e in _entries(base_dir))
    weights = params * DTYPE_BYTES[dtype]
    adapter_bytes = sum(a.weights.stat().st_size for a in adapters) * DTYPE_BYTES[dtype] // 4
    logits = WINDOW * _vocab_size(base_dir) * 4 * LOGIT_COPIES
    return MemoryEstimate(
        "check (PyTorch reference)",
        REFERENCE_PROCESS + weights + adapter_bytes + logits,
        f"process {_mib(REFERENCE_PROCESS)} + base in {dtype} {_mib(weights)} + adapters {_mib(adapter_bytes)} "
        f"+ logits of a {WINDOW}-token window {_mib(logits)}",
    )


def estimate_gguf_eval(base_dir: Path, gguf_bytes: int) -> MemoryEstimate:
    """Peak resident memory of a llama.cpp child scoring a GGUF of `gguf_bytes`."""
    logits = WINDOW * _vocab_size(base_dir) * 4 * 2
    return MemoryEstimate(
        "check (GGUF evaluation)",
        LLAMA_CHILD + gguf_bytes + logits,
        f"process {_mib(LLAMA_CHILD)} + GGUF {_mib(gguf_bytes)} + logits {_mib(logits)}",
    )


def _over(estimate: MemoryEstimate, limit: int, fix: str) -> InputError:
    return InputError(
        f"--max-memory {_mib(limit)} is too little: the {estimate.stage} needs about {_mib(estimate.peak_bytes)} "
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
    if reference.peak_bytes > limit and not dtype_fixed and options.reference_dtype == "float32":
        # Even if bfloat16 does not fit either, its estimate is the one to report.
        options = replace(options, reference_dtype="bfloat16")
        reference = estimate_reference(base_dir, adapters, "bfloat16")
    if reference.peak_bytes > limit:
        fix = (
            "Pass --reference-dtype bfloat16 (half the weights), raise --max-memory, or skip the check with --no-check."
            if options.reference_dtype == "float32"
            else "Raise --max-memory, or skip the check with --no-check."
        )
        raise _over(reference, limit, fix)
    evaluation = estimate_gguf_eval(base_dir, largest_gguf_bytes)
    if evaluation.peak_bytes > limit:
        raise _over(evaluation, limit, "Raise --max-memory, or skip the check with --no-check.")
    return options, [reference, evaluation]


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


# Estimates of the stages a batch schedules side by side (the converter and the quantizer hold about one
# tensor at a time in float32, in and out, beside their process).
CONVERT_PROCESS = 400 * MiB  # python + torch + llama.cpp's converter
CONVERT_COPIES = 3  # the tensor read, its float32 copy, the one written
QUANTIZE_COPIES = 3  # the float32 tensor, its quantized output, imatrix/working rows


def estimate_stage(
    stage: str, base_dir: Path, adapters: list[LoraAdapter], reference_dtype: str = "float32"
) -> int:
    """Peak resident bytes of one stage of an export graph, by the stage's name (exporter/faults.py lists them)."""
    kind = stage.split(":")[0]
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
