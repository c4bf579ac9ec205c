"""lora: a PEFT LoRA adapter ──scale-correct + convert_lora_to_gguf──▶ <adapter>.lora.gguf for one base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.lora_to_gguf import KEY_PREFIX, convert_lora_to_gguf
from exporter.adapter import LoraAdapter
from exporter.run import Run
from exporter.runtime_adapter import ScaleCorrection, describe_correction
from exporter.stage_keys import lora_key

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

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.gguf.name,
            "source": str(self.source.path.resolve()),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "scale_correction": describe_correction(self.correction),
            "corrected_modules": self.correction.corrected_modules,
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
        meta.update(what=f"{name} GGUF LoRA")

    entry = run.stage(f"lora:{name}", "lora", key, produce, {LORA_FILE: target})
    return RuntimeAdapter(
        name, adapter, target, entry.meta["files"][LORA_FILE], target.stat().st_size, correction
    )
