"""Typed records of what the pipeline produces, and what a GGUF file says about itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quant_profiles import LLAMA_FTYPES

FTYPE_NAMES = {number: name for name, number in LLAMA_FTYPES.items()}


@dataclass(frozen=True)
class GGUFHeader:
    """The header facts edge-export checks: architecture, file type, parameter count."""

    architecture: str
    file_type: int | None
    n_params: int
    n_tensors: int
    chat_template: str | None

    @property
    def file_type_name(self) -> str:
        if self.file_type is None:
            return "unknown"
        return FTYPE_NAMES.get(self.file_type, str(self.file_type))


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor table (memory-mapped; no tensor data is read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field_value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return GGUFHeader(
        architecture=str(field_value("general.architecture")),
        file_type=field_value("general.file_type"),
        n_params=n_params,
        n_tensors=len(reader.tensors),
        chat_template=field_value("tokenizer.chat_template"),
    )


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
