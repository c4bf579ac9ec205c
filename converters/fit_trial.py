"""One trial of the fit search: quantize a 16-bit GGUF with per-tensor types and score it, in one child.

The child runs llama.cpp's own quantizer (converters.quantize, with the tensor-type overrides of the
quantize parameters) into a scratch file, loads that file with llama-cpp-python and scores it against a
reference (converters.llama_runtime's scoring, without the greedy answers), then deletes the file: a
trial's measure is a number, not a GGUF. One child for both spares a process start per trial.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.child import child_main, run_child
from quant_profiles import GGML_TYPES, LLAMA_FTYPES


def run_trial(
    source: Path,
    scratch: Path,
    ftype: str,
    tensor_types: dict[str, str],
    sequences: Sequence[Sequence[int]],
    reference_file: Path,
    threads: int | None = None,
    imatrix: Path | None = None,
    device: str = "cpu",
    keep: bool = False,
    metadata: dict[str, str | int] | None = None,
) -> dict[str, Any]:
    """Quantize `source` to `ftype` with `tensor_types` (pattern -> ggml type) in `scratch`, score it on
    `sequences` against `reference_file`; returns {"mean_kld", "size_bytes", "seconds"}. With `keep`, the
    quantized file stays at scratch/trial.gguf for the caller to read (and remove). `metadata`: extra GGUF
    keys, as converters.quantize writes them (the fitted file's own, so that its header is sized too)."""
    nthread = threads or os.cpu_count() or 1
    request = {
        "source": str(source),
        "target": str(scratch / "trial.gguf"),
        "output": str(scratch / "scores.npz"),
        "ftype": LLAMA_FTYPES[ftype],
        "nthread": nthread,
        "output_tensor_type": None,
        "token_embedding_type": None,
        "tensor_types": {pattern: GGML_TYPES[t] for pattern, t in tensor_types.items()},
        "imatrix": str(imatrix) if imatrix else None,
        "metadata": metadata or {},
        "sequences": [list(s) for s in sequences],
        "reference": str(reference_file),
        "n_ctx": max(len(s) for s in sequences),
        "threads": nthread,
        "device": device,
    }
    try:
        return run_child("converters.fit_trial", request, f"A fit trial of {source.name}")
    finally:
        if not keep:
            (scratch / "trial.gguf").unlink(missing_ok=True)
        (scratch / "scores.npz").unlink(missing_ok=True)


def _trial(request: dict[str, Any]) -> dict[str, Any]:
    import time

    import numpy as np

    from converters.llama_runtime import _score
    from converters.quantize import _quantize_in_child

    start = time.perf_counter()
    quantized = _quantize_in_child(request)
    if "error" in quantized:
        return quantized
    size = Path(request["target"]).stat().st_size
    _score(dict(request, gguf=request["target"], prompts=[], max_new_tokens=0, lora=None))
    with np.load(request["output"]) as scores:
        kld = float(np.mean(scores["kld"]))
    return {"mean_kld": kld, "size_bytes": size, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    child_main(_trial)
