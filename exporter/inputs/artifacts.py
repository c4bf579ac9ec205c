"""Typed records of what the pipeline produces (a GGUF file's own header is read by converters.gguf_header)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exporter.inputs.safetensors_header import gguf_source_ftype

FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class MergeResult:
    """A merged Hugging Face folder: where, how many tensors the adapters changed, dtype, shards."""

    path: Path
    merged_tensors: int
    total_tensors: int
    dtype: str
    shards: int
    untied_embeddings: bool = False
    shard_sha256: dict[str, str] = field(default_factory=dict)  # computed while writing; empty when reused
    # Largest |value| over the floating-point tensors written, when the output dtype could exceed
    # float16's range (bfloat16, float32); None for a float16 output, which is range-checked as written.
    max_abs: float | None = None
    dtype_reason: str = ""
    # The coverage ledger (exporter.merge.coverage): where every adapter tensor went, how many targeted
    # tensors the merge changed.
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def gguf_ftype(self) -> str:
        """The llama.cpp type the converter writes this folder in: bf16 stays bf16, never a silent Inf."""
        return gguf_source_ftype(self.dtype)

    @property
    def fits_float16(self) -> bool:
        return self.max_abs is None or self.max_abs <= FLOAT16_MAX


@dataclass(frozen=True)
class GGUFArtifact:
    """One GGUF file the pipeline wrote."""

    path: Path
    profile: str
    file_type: str
    size_bytes: int
    bits_per_weight: float
    sha256: str
    seconds: float

    def to_json(self, root: Path) -> dict[str, Any]:
        record = asdict(self)
        record["path"] = (
            self.path.relative_to(root).as_posix() if self.path.is_relative_to(root) else str(self.path)
        )
        return record
