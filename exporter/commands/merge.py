"""`edge-export merge`: the merged Hugging Face folder alone, written atomically at --out."""

from __future__ import annotations

from exporter.core.errors import InputError
from exporter.core.locks import hold_lock, output_lock_path
from exporter.core.paths import refuse_output_in_inputs
from exporter.engine.memory import fit_merge
from exporter.engine.preflight import check_writable
from exporter.engine.run import Reporter, silent, utc_now
from exporter.inputs.artifacts import MergeResult
from exporter.inputs.manifest import merge_provenance
from exporter.inputs.options import MergeOptions
from exporter.inputs.records import ModelInputs, read_inputs
from exporter.inputs.trained_on import detect_trained_on


def merge_model(options: MergeOptions, report: Reporter = silent) -> MergeResult:
    """Merge the adapters into the base and write the folder (the merge writes to a staging folder and
    renames it into place, so --out is never half-written)."""
    adapters, base_dir = read_inputs(options.inputs)
    out = options.output.out
    refuse_output_in_inputs(out, [("base", base_dir), *(("adapter", a.path) for a in adapters)])
    with hold_lock(output_lock_path(out), f"the output folder {out}", options.run.lock):
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.output.force:
            raise InputError(
                f"The output folder {out} already exists and is not empty. Refusing to overwrite it; pass --force "
                "to replace it, or choose another --out."
            )
        check_writable(out)
        from exporter.merge import DTYPES, merge_adapters  # torch: imported when there is merging to do

        if options.run.max_memory:
            requested = DTYPES.get((options.dtype or "").lower())
            itemsize = requested.itemsize if requested else 2
            estimate = fit_merge(base_dir, adapters, options.run.max_memory, itemsize)
            report(f"memory: the merge needs about {estimate.peak_bytes >> 20} MiB ({estimate.detail})")
        report(f"merging {len(adapters)} adapter(s) into {base_dir}")
        trained_on = detect_trained_on(base_dir, [a.path for a in adapters])
        if trained_on is not None:
            report(
                f"note: a QLoRA adapter (trained on {trained_on.describe()}), merged onto the 16-bit base; "
                "merge-quantize checks it against the model as trained and compares both merge bases"
            )
        inputs = ModelInputs.hashed(base_dir, tuple(adapters))
        return merge_adapters(
            base_dir,
            adapters,
            out,
            dtype=options.dtype,
            max_shard_bytes=options.max_shard_bytes,
            provenance=merge_provenance(inputs, utc_now()),
        )
