"""Every stage's cache key, in one place: what determines the bytes each stage produces.

A key names every input (by content, never by path) and every tool version that shapes the output.
Changing a payload here invalidates every cache entry of that stage for every user, so
tests/test_stage_keys.py pins each key for fixed inputs: a change must be deliberate.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from exporter.engine.stage_cache import stage_key

# Bumped when the merge writes different bytes from the same inputs (2: ΔW added by one fused addmm;
# 3: config and tokenizer files written in the dialect both transformers majors read; 4: the provenance
# file and the stage's record carry the coverage ledger).
MERGE_ARITHMETIC = 4
REFERENCE_FORMAT = 1


def merge_key(inputs: dict[str, Any], dtype: str | None, versions: dict[str, str]) -> str:
    """`inputs`: the content of base and adapters (ModelInputs.content())."""
    return stage_key(
        {
            "stage": "merge",
            "inputs": inputs,
            "dtype": dtype,
            "arithmetic": MERGE_ARITHMETIC,
            "versions": {k: versions[k] for k in ("edge-export", "torch", "safetensors")},
        }
    )


def convert_key(merge: str, llama_cpp: str, outtype: str, name: str) -> str:
    return stage_key(
        {"stage": "convert", "merge": merge, "llama.cpp": llama_cpp, "outtype": outtype, "name": name}
    )


def mmproj_key(merge: str, llama_cpp: str, outtype: str, name: str) -> str:
    return stage_key(
        {"stage": "mmproj", "merge": merge, "llama.cpp": llama_cpp, "outtype": outtype, "name": name}
    )


def convert_base_key(base_files: dict[str, str], llama_cpp: str, outtype: str, name: str, uuid: str) -> str:
    return stage_key(
        {
            "stage": "convert-base",
            "base": base_files,
            "llama.cpp": llama_cpp,
            "outtype": outtype,
            "name": name,
            "uuid": uuid,
        }
    )


def quantize_key(
    convert: str,
    llama_cpp_python: str,
    ftype: str,
    overrides: dict[str, Any],
    imatrix: str | None,
    runtime_base: bool = False,
) -> str:
    """A merged model's quantization; `runtime_base`: a bare base's (whose key never named an imatrix)."""
    payload: dict[str, Any] = {
        "stage": "quantize",
        "convert": convert,
        "llama-cpp-python": llama_cpp_python,
        "ftype": ftype,
        "overrides": overrides,
    }
    if not runtime_base:
        payload["imatrix"] = imatrix
    return stage_key(payload)


def imatrix_key(convert: str, calibration: str, max_tokens: int, dtype: str, versions: dict[str, str]) -> str:
    return stage_key(
        {
            "stage": "imatrix",
            "convert": convert,
            "calibration": calibration,
            "max_tokens": max_tokens,
            "dtype": dtype,
            "versions": {k: versions[k] for k in ("edge-export", "torch", "transformers")},
        }
    )


def given_imatrix_key(convert: str, sha256: str) -> str:
    return stage_key({"stage": "imatrix-given", "convert": convert, "sha256": sha256})


def chat_key(merge: str, edge_export: str, ollama_version: str, llama_cpp_commit: str) -> str:
    return stage_key(
        {
            "stage": "chat",
            "merge": merge,
            "edge-export": edge_export,
            "ollama": ollama_version,
            "llama.cpp": llama_cpp_commit,
        }
    )


def parity_key(convert: str, edge_export: str, checks: int) -> str:
    """`checks`: the version of what the parity check covers (2: every added token, both directions)."""
    return stage_key({"stage": "parity", "convert": convert, "edge-export": edge_export, "checks": checks})


def lora_key(
    adapter_files: dict[str, str], base_convert: str, llama_cpp: str, factors: dict[str, float]
) -> str:
    return stage_key(
        {
            "stage": "lora",
            "adapter": adapter_files,
            "base": base_convert,
            "llama.cpp": llama_cpp,
            "outtype": "f16",
            "factors": factors,
        }
    )


def reference_key(inputs: dict[str, Any], eval_fingerprint: Any, top_k: int, dtype: str, max_new_tokens: int,
                  versions: dict[str, str], trained_on: dict[str, Any] | None = None) -> str:  # fmt: skip
    """The unmerged model's reference; `trained_on`: its base rounded to 4 bits as in QLoRA training."""
    payload: dict[str, Any] = {
        "format": REFERENCE_FORMAT,
        "inputs": inputs,
        "eval": eval_fingerprint,
        "top_k": top_k,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "versions": {p: versions[p] for p in ("torch", "transformers", "peft")},
    }
    if trained_on is not None:
        payload["trained_on"] = trained_on
        payload["versions"]["bitsandbytes"] = versions["bitsandbytes"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def image_reference_key(inputs: dict[str, Any], rows: list[Any], top_k: int, dtype: str, max_new_tokens: int,
                        versions: dict[str, str]) -> str:  # fmt: skip
    """The unmerged vision-language model's answers on the image rows (each image by its sha256)."""
    payload = {"stage": "reference-images", "format": 2, "inputs": inputs, "rows": rows, "top_k": top_k}
    payload["dtype"] = dtype
    payload["max_new_tokens"] = max_new_tokens
    return stage_key({**payload, "versions": {p: versions[p] for p in ("torch", "transformers", "peft")}})


def image_quality_key(
    artifact: str, mmproj: str, reference: str, llama_cpp_python: str, lora: str | None = None
) -> str:
    """One GGUF (and a runtime LoRA) with its projector scored on the image rows by one llama.cpp runtime."""
    payload = {"stage": "quality-images", "artifact": artifact, "mmproj": mmproj, "reference": reference}
    if lora is not None:
        payload["lora"] = lora
    return stage_key({**payload, "llama-cpp-python": llama_cpp_python})


def floor_key(merge: str, reference: str, versions: dict[str, str]) -> str:
    """The merged folder scored in PyTorch against the reference (the 16-bit floor)."""
    payload = {"stage": "floor", "merge": merge, "reference": reference}
    return stage_key({**payload, "versions": {p: versions[p] for p in ("torch", "transformers")}})


def quality_key(
    artifact: str,
    reference: str,
    device: str,
    llama_cpp_python: str,
    lora: str | None = None,
    held_out: list[int] | None = None,
) -> str:
    """One GGUF (or base GGUF + GGUF LoRA) scored against one reference by one llama.cpp runtime;
    `held_out`: the windows a fit search did not use, whose mean KLD the metrics also give."""
    payload: dict[str, Any] = {"stage": "quality", "artifact": artifact}
    if lora is not None:
        payload["lora"] = lora
    if held_out is not None:
        payload["held_out"] = held_out
    payload.update({"reference": reference, "device": device, "llama-cpp-python": llama_cpp_python})
    return stage_key(payload)


def dequantize_key(base_files: dict[str, str], trained_on: dict[str, Any], versions: dict[str, str]) -> str:
    """The 16-bit base with its 4-bit-trained weights replaced by dequant(Q4(W)) (QLoRA's merge candidate)."""
    return stage_key(
        {
            "stage": "dequantize",
            "base": base_files,
            "trained_on": trained_on,
            "versions": {k: versions[k] for k in ("edge-export", "torch", "transformers", "bitsandbytes")},
        }
    )


def unpack_key(base_files: dict[str, str], versions: dict[str, str]) -> str:
    """A bitsandbytes 4-bit base dequantized to the 16-bit folder it stands for (--dequantize-base)."""
    return stage_key(
        {
            "stage": "unpack",
            "base": base_files,
            "versions": {k: versions[k] for k in ("edge-export", "torch", "bitsandbytes")},
        }
    )


def losses_key(quality: str) -> str:
    """A GGUF's scoring that also keeps its per-token losses (the merge-base decision compares them)."""
    return stage_key({"stage": "losses", "quality": quality})


def stops_key(
    ggufs: dict[str, str], terminator: str | None, prompt: str, max_tokens: int, edge_export: str
) -> str:
    """`ggufs`: label -> sha256 of each GGUF checked (the llama.cpp runtime is pinned with them)."""
    return stage_key(
        {
            "stage": "stops",
            "ggufs": ggufs,
            "terminator": terminator,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "edge-export": edge_export,
        }
    )


def fit_trial_key(
    convert: str,
    reference: str,
    windows: list[int],
    tensor_types: dict[str, str],
    imatrix: str | None,
    llama_cpp_python: str,
    metadata: dict[str, str | int] | None = None,
) -> str:
    """One trial of the fit search: the 16-bit GGUF quantized with these types per tensor (the name of
    every tensor named, so the key does not depend on how the tensors were grouped) and these extra GGUF
    keys (whose size the search's prediction counts), scored on `windows`."""
    return stage_key(
        {
            "stage": "fit-trial",
            "convert": convert,
            "reference": reference,
            "windows": windows,
            "tensor_types": tensor_types,
            "imatrix": imatrix,
            "metadata": metadata or {},
            "llama-cpp-python": llama_cpp_python,
        }
    )
