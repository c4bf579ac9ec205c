"""merge: adapters + base ──▶ the merged Hugging Face folder (safetensors, config, tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.engine.run import Run
from exporter.engine.stage_keys import merge_key
from exporter.inputs.artifacts import MergeResult
from exporter.inputs.manifest import merge_provenance
from exporter.inputs.records import MergedModel, ModelInputs
from quant_profiles import QuantProfile

MERGED_DIR = "merged"


def merge_stage(
    run: Run,
    inputs: ModelInputs,
    dtype: str | None,
    what: str,
    target: Path | None,
    name: str = "merge",
    weights_needed: Callable[[str, dict[str, Any]], bool] | None = None,
) -> MergedModel:
    """The merged folder for these inputs, built once and linked at `target` (None: left in the cache,
    as a candidate that may not be kept). A cached merge whose weights were released (`release_weights`)
    is merged again when `weights_needed(its key, its meta)` says a stage still to run reads them."""
    key = merge_key(inputs.content(), dtype, run.versions)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        from exporter.merge import merge_adapters  # torch: imported when there is merging to do

        run.report(f"merging {len(inputs.adapters)} adapter(s) into {inputs.base_dir}")
        built = merge_adapters(
            inputs.base_dir,
            list(inputs.adapters),
            staging / MERGED_DIR,
            dtype=dtype,
            provenance=merge_provenance(inputs, run.started_utc),
        )
        meta.update(
            files={f"{MERGED_DIR}/{shard}": digest for shard, digest in built.shard_sha256.items()},
            what=f"merged {what} ({built.dtype})",
            merged_tensors=built.merged_tensors,
            total_tensors=built.total_tensors,
            dtype=built.dtype,
            shards=built.shards,
            untied=built.untied_embeddings,
            max_abs=built.max_abs,
            dtype_reason=built.dtype_reason,
            coverage=built.coverage,
        )

    outputs = {MERGED_DIR: target} if target else {}
    entry = run.stage(name, "merge", key, produce, outputs)
    if entry.meta.get("released") and (weights_needed is None or weights_needed(key, entry.meta)):
        run.report(f"{name}: the cached merge gave up its weights after conversion; merging again")
        run.cache.evict("merge", key)
        run.reused.discard(name)
        entry = run.stage(name, "merge", key, produce, outputs)
    if name in run.reused:
        run.report(f"{name}: reusing the cached merged model")
    meta = entry.meta
    if meta.get("coverage"):
        run.report(f"{name}: {meta['coverage']['summary']}")
    result = MergeResult(
        target or entry.path / MERGED_DIR,
        meta["merged_tensors"],
        meta["total_tensors"],
        meta["dtype"],
        meta["shards"],
        meta["untied"],
        max_abs=meta.get("max_abs"),
        dtype_reason=meta.get("dtype_reason", ""),
        coverage=meta.get("coverage", {}),
    )
    return MergedModel(result, key)


def check_float16_range(merged: MergedModel, profiles: tuple[QuantProfile, ...], base_dir: Path) -> None:
    """A float16 GGUF made from a bfloat16 or float32 merge must not overflow to Inf."""
    result = merged.result
    if result.gguf_ftype == "F16" and not result.fits_float16:  # a --dtype float16 merge
        raise InputError(
            f"The merged model holds values up to {result.max_abs:.6g}, beyond float16's range (±65504), and "
            f"the converter writes {result.dtype} merges as F16, which would hold Inf there. Pass --dtype "
            "bfloat16 (or leave --dtype out: a bfloat16 base that does not fit float16 stays bfloat16)."
        )
    wanted = [
        p.name
        for p in profiles
        if not p.is_source(result.gguf_ftype)
        and (p.ftype == "F16" or "F16" in p.overrides.tensor_types.values())
    ]
    if wanted and not result.fits_float16:
        raise InputError(
            f"The merged model holds values up to {result.max_abs:.6g}, beyond float16's range (±65504), so "
            f"{', '.join(wanted)} would hold Inf where the model has large weights (the base {base_dir} is "
            f"{result.dtype}). Ask for BF16 instead, or a quantized profile (Q8_0, Q4_K_M, …), which keep the range."
        )


def release_weights(run: Run, merged: MergedModel) -> int:
    """Give up the merged model's weights once its 16-bit GGUF holds them (nothing reads them again): in
    the cache and in the output's merged/, which keeps its config, tokenizer and chat template (read by
    the chat, parity and reference stages). Returns the bytes freed."""
    entry = run.cache.lookup("merge", merged.key, verify=False)
    if entry is None:
        return 0
    weights = [
        name
        for name in entry.meta.get("files", {})
        if name.startswith(f"{MERGED_DIR}/") and name.endswith((".safetensors", ".safetensors.index.json"))
    ]
    for name in weights:
        (merged.path / name.removeprefix(f"{MERGED_DIR}/")).unlink(missing_ok=True)
    return run.cache.release("merge", merged.key, weights)
