"""merge: adapters + base ──▶ the merged Hugging Face folder (safetensors, config, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.artifacts import MergeResult
from exporter.manifest import merge_provenance
from exporter.records import MergedModel, ModelInputs
from exporter.run import Run
from exporter.stage_keys import merge_key

MERGED_DIR = "merged"


def merge_stage(
    run: Run, inputs: ModelInputs, dtype: str | None, what: str, target: Path | None, name: str = "merge"
) -> MergedModel:
    """The merged folder for these inputs, built once and linked at `target` (None: left in the cache,
    as a candidate that may not be kept)."""
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

    entry = run.stage(name, "merge", key, produce, {MERGED_DIR: target} if target else {})
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
