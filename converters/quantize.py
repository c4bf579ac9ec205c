"""Quantize an F16 GGUF to a profile with llama.cpp's own quantizer (llama_model_quantize).

The quantizer runs in a child process (crash isolation; see converters.child). The parent writes
to a temporary name and renames only a finished file, so no half-written GGUF ever looks done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from converters.child import child_main, run_child
from quant_profiles import GGML_TYPES, QuantProfile


def quantize_gguf(
    source: Path,
    target: Path,
    profile: QuantProfile,
    threads: int | None = None,
    imatrix: Path | None = None,
    metadata: dict[str, str | int] | None = None,
) -> None:
    """Quantize `source` (F16 GGUF) into `target` following `profile`; `target` appears only when done.

    `imatrix` is an importance-matrix GGUF (llama-imatrix layout); `metadata` are extra GGUF keys
    written into the output (strings up to 127 bytes, or unsigned integers).
    """
    overrides = profile.overrides
    request = {
        "source": str(source),
        "target": str(target),
        "ftype": profile.ftype_id,
        "nthread": threads or os.cpu_count() or 1,
        "output_tensor_type": GGML_TYPES.get(overrides.output_tensor_type or ""),
        "token_embedding_type": GGML_TYPES.get(overrides.token_embedding_type or ""),
        "tensor_types": {pattern: GGML_TYPES[t] for pattern, t in overrides.tensor_types.items()},
        "imatrix": str(imatrix) if imatrix else None,
        "metadata": metadata or {},
    }
    partial = target.with_name(f".{target.name}.partial")
    request["target"] = str(partial)
    try:
        run_child("converters.quantize", request, f"Quantizing {source.name} to {profile.name}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _quantize_in_child(request: dict[str, Any]) -> dict[str, Any]:
    import ctypes

    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(request["nthread"])
    params.ftype = int(request["ftype"])
    if request["output_tensor_type"] is not None:
        params.output_tensor_type = int(request["output_tensor_type"])
    if request["token_embedding_type"] is not None:
        params.token_embedding_type = int(request["token_embedding_type"])
    keep_alive = []
    if request["tensor_types"]:
        items = list(request["tensor_types"].items())
        overrides = (llama_cpp.llama_model_tensor_override * (len(items) + 1))()
        for i, (pattern, type_id) in enumerate(items):
            encoded = pattern.encode()
            keep_alive.append(encoded)
            overrides[i].pattern = encoded
            overrides[i].type = int(type_id)
        overrides[len(items)].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep_alive.append(overrides)
    if request.get("imatrix"):
        entries = _imatrix_entries(request["imatrix"])
        array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(entries):
            encoded = name.encode()
            keep_alive += [encoded, values]
            array[i].name = encoded
            array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = values.size
        array[len(entries)].name = None  # terminator
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(array)
    if request.get("metadata"):
        items = list(request["metadata"].items())
        kv = (llama_cpp.llama_model_kv_override * (len(items) + 1))()  # zeroed: the last one ends the list
        for i, (key, value) in enumerate(items):
            kv[i].key = key.encode()[:127]
            if isinstance(value, int):
                kv[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                kv[i].value.val_i64 = value  # type: ignore[union-attr]
            else:
                kv[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                kv[i].value.val_str = str(value).encode()[:127]  # type: ignore[union-attr]
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep_alive.append(kv)
    status = llama_cpp.llama_model_quantize(
        request["source"].encode(), request["target"].encode(), ctypes.byref(params)
    )
    if status != 0:
        return {"error": f"llama_model_quantize returned {status}; see llama.cpp's log above"}
    return {"ok": True}


def _imatrix_entries(path: str) -> list[tuple[str, Any]]:
    """(GGUF tensor name, mean squared activation per column) from an importance-matrix GGUF."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    entries = []
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            weight = name.removesuffix(".in_sum2")
            counts = np.maximum(tensors[f"{weight}.counts"], 1.0)  # one per expert (llama-imatrix's layout)
            means = sums.reshape(counts.size, -1) / counts[:, None]
            entries.append((weight, np.ascontiguousarray(means.reshape(-1), dtype=np.float32)))
    return entries


if __name__ == "__main__":
    child_main(_quantize_in_child)
