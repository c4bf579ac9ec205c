"""manifest.json: what an export holds and where it came from, written once at the end of a run.

The manifest is the one provenance record of an export: tools and their versions, the resolved
options, every input file's sha256, every output's sha256, the stages' times and which were reused
from the cache, and the quality result. `check` reads it back to score the export again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.core.atomic import write_text_atomic
from exporter.core.errors import InputError
from exporter.core.version import __version__
from exporter.inputs.records import ModelInputs

MANIFEST = "manifest.json"
EXPORT_FORMAT = "edge-export/manifest/1"
RUNTIME_LORA_FORMAT = "edge-export/runtime-lora-manifest/1"
COMMON = ("format", "name", "created_utc", "tools", "options", "inputs")
TRAILING = ("stage_seconds", "cached_stages", "notes", "quality")


@dataclass
class Manifest:
    """A manifest in memory: the common fields, and the command's own sections in the order written."""

    format: str
    name: str
    created_utc: str
    tools: dict[str, str]
    options: dict[str, Any]
    inputs: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {key: getattr(self, key) for key in COMMON}
        data.update(self.sections)
        data["stage_seconds"] = self.stage_seconds
        data["cached_stages"] = self.cached_stages
        if self.notes:
            data["notes"] = self.notes
        if self.quality is not None:
            data["quality"] = self.quality
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        sections = {k: v for k, v in data.items() if k not in COMMON and k not in TRAILING}
        return cls(
            **{key: data[key] for key in COMMON},
            sections=sections,
            stage_seconds=data.get("stage_seconds", {}),
            cached_stages=data.get("cached_stages", []),
            notes=data.get("notes", []),
            quality=data.get("quality"),
        )

    def write(self, folder: Path) -> Path:
        target = folder / MANIFEST
        write_text_atomic(target, json.dumps(self.to_json(), indent=2) + "\n")
        return target

    @classmethod
    def read(cls, path: Path, format: str = EXPORT_FORMAT) -> Manifest:
        """A manifest written by edge-export (of the given format), or an InputError that says what is wrong."""
        if not path.is_file():
            raise InputError(
                f"The manifest {path} does not exist. Pass the manifest.json that merge-quantize wrote."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path} is not valid JSON ({exc}); pass the manifest.json that merge-quantize wrote."
            ) from exc
        if not isinstance(data, dict) or data.get("format") != format:
            found = data.get("format") if isinstance(data, dict) else None
            raise InputError(f"{path} is not an edge-export manifest (format {found!r}).")
        missing = [key for key in (*COMMON, "artifacts") if key not in data]
        if missing:
            raise InputError(f"{path} lacks {', '.join(missing)}; re-run merge-quantize to write it again.")
        return cls.from_json(data)

    @property
    def scored_records(self) -> list[dict[str, Any]]:
        """Every GGUF record a quality check scores: the unquantized GGUF first, then each profile's."""
        return [*self.sections.get("intermediates", []), *self.sections.get("artifacts", [])]


def merge_provenance(inputs: ModelInputs, created_utc: str) -> dict[str, Any]:
    """What a merged folder came from: tool version, the base, and the adapters (hashes of theirs only:
    bases can be huge)."""
    return {
        "tool": f"edge-export {__version__}",
        "created_utc": created_utc,
        "base": str(inputs.base_dir.resolve()),
        "adapters": inputs.adapter_records(),
    }
