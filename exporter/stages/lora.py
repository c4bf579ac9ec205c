"""lora: a PEFT LoRA adapter ──scale-correct + convert_lora_to_gguf──▶ <adapter>.lora.gguf for one base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.gguf_header import read_gguf_metadata
from converters.lora_to_gguf import KEY_PREFIX, convert_lora_to_gguf
from exporter.core.errors import StageError
from exporter.engine.run import Run
from exporter.engine.stage_keys import lora_key
from exporter.inputs.adapter import LoraAdapter
from exporter.merge.runtime_adapter import ScaleCorrection, describe_correction

LORA_FILE = "adapter.gguf"


@dataclass
class RuntimeAdapter:
    """A GGUF LoRA in the output, made for one base GGUF."""

    name: str
    source: LoraAdapter
    gguf: Path
    sha256: str
    size_bytes: int
    correction: ScaleCorrection
    coverage: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.gguf.name,
            "source": str(self.source.path.resolve()),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "scale_correction": describe_correction(self.correction),
            "corrected_modules": self.correction.corrected_modules,
            "coverage": self.coverage,
        }


def lora_coverage(gguf: Path, correction: ScaleCorrection, weights: Path) -> dict[str, Any]:
    """The runtime ledger: every base tensor the adapter targets carried by the GGUF LoRA, none dropped by
    the converter. A stacked expert pair (blk.N.ffn_*_exps) carries one targeted tensor per expert."""
    _, tensors = read_gguf_metadata(gguf, ())
    pairs = [dims for name, dims in tensors.items() if name.endswith(".lora_a")]
    carried = sum(dims[2] if len(dims) == 3 else 1 for dims in pairs)
    targeted = len(correction.factors)
    if carried != targeted:
        raise StageError(
            f"llama.cpp's LoRA converter wrote {len(pairs)} LoRA pairs carrying {carried} base tensors, but "
            f"{weights} targets {targeted}: the GGUF LoRA would not apply the whole adapter. This is a bug to "
            "report; merge-quantize merges the adapter instead."
        )
    return {
        "targeted_tensors": targeted,
        "carried_tensors": carried,
        "lora_pairs": len(pairs),
        "summary": f"carries {carried} of {targeted} targeted tensors in {len(pairs)} GGUF LoRA pairs",
    }


def lora_stage(
    run: Run,
    name: str,
    adapter: LoraAdapter,
    adapter_files: dict[str, str],
    correction: ScaleCorrection,
    base_dir: Path,
    base_convert_key: str,
    identity: dict[str, str],
    target: Path,
) -> RuntimeAdapter:
    """The adapter as a GGUF LoRA for the base GGUF whose identity is given, linked at `target`."""
    key = lora_key(adapter_files, base_convert_key, run.vendored.commit, correction.factors)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"converting the adapter {adapter.path} to a GGUF LoRA")
        metadata = {f"{KEY_PREFIX}base.{k}": v for k, v in identity.items()}
        metadata[f"{KEY_PREFIX}adapter.scale_correction"] = describe_correction(correction)
        convert_lora_to_gguf(
            adapter.path,
            adapter.config,
            adapter.weights,
            base_dir,
            staging / LORA_FILE,
            run.vendored,
            correction.factors,
            metadata,
            expanded=correction.expanded,
            dropped=correction.dropped,
        )
        coverage = lora_coverage(staging / LORA_FILE, correction, adapter.weights)
        meta.update(what=f"{name} GGUF LoRA", coverage=coverage)

    entry = run.stage(f"lora:{name}", "lora", key, produce, {LORA_FILE: target})
    coverage = entry.meta.get("coverage") or lora_coverage(target, correction, adapter.weights)
    run.report(f"lora:{name}: {coverage['summary']}")
    return RuntimeAdapter(
        name, adapter, target, entry.meta["files"][LORA_FILE], target.stat().st_size, correction, coverage
    )
