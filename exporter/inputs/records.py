"""Typed records that stages return and manifests are made of."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.gguf_header import GGUFHeader
from exporter.core.hashing import HashMemo, hash_files
from exporter.inputs.adapter import LoraAdapter, read_adapter, resolve_base
from exporter.inputs.artifacts import GGUFArtifact, MergeResult
from exporter.inputs.options import InputOptions

INPUT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")


def sanitize_name(raw: str) -> str:
    """A model name that is safe in a file name: no path separators, no odd characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip(".-_")
    return cleaned[:80] or "model"


def input_files(folder: Path) -> list[Path]:
    """The files of a model or adapter folder that determine what it is (hashed into keys and manifests)."""
    return [p for p in folder.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES]


def read_inputs(options: InputOptions) -> tuple[list[LoraAdapter], Path]:
    """The adapters, read and validated, and the base folder they name (or --base)."""
    adapters = [read_adapter(path, weight, options.allow_pickle) for path, weight in options.adapters]
    return adapters, resolve_base(options.base, adapters[0])


@dataclass(frozen=True)
class ModelInputs:
    """The adapters and the base, read and validated, with every input file's sha256."""

    base_dir: Path
    adapters: tuple[LoraAdapter, ...]
    base_files: dict[str, str]
    adapter_files: tuple[dict[str, str], ...]

    @classmethod
    def hashed(
        cls, base_dir: Path, adapters: tuple[LoraAdapter, ...], memo: HashMemo | None = None
    ) -> ModelInputs:
        return cls(
            base_dir,
            adapters,
            hash_files(input_files(base_dir), base_dir, memo),
            tuple(hash_files(input_files(a.path), a.path, memo) for a in adapters),
        )

    def only(self, adapter: LoraAdapter) -> ModelInputs:
        """The same base with one of the adapters."""
        index = self.adapters.index(adapter)
        return ModelInputs(self.base_dir, (adapter,), self.base_files, (self.adapter_files[index],))

    def content(self) -> dict[str, Any]:
        """The inputs' content without their paths: what keys of stages built from them name."""
        return {
            "base": self.base_files,
            "adapters": [
                {"files": files, "weight": a.weight}
                for a, files in zip(self.adapters, self.adapter_files, strict=True)
            ],
        }

    def adapter_records(self) -> list[dict[str, Any]]:
        """Each adapter as the user named it; one read through a translation (mlx-lm) also names the PEFT
        files it was read as."""
        records = []
        for a, files in zip(self.adapters, self.adapter_files, strict=True):
            record = {
                "path": str(a.folder.resolve()),
                "weight": a.weight,
                "peft_type": a.peft_type,
                "files": files,
            }
            if a.origin is not None:
                record["files"] = hash_files(input_files(a.origin), a.origin)
                record["read_as"] = {"path": str(a.path), "files": files}
            records.append(record)
        return records

    def to_json(self) -> dict[str, Any]:
        """The manifest's "inputs"."""
        return {
            "adapters": self.adapter_records(),
            "base": {"path": str(self.base_dir.resolve()), "files": self.base_files},
        }


@dataclass(frozen=True)
class MergedModel:
    """The merged Hugging Face folder in the output, and the key of the merge that made it."""

    result: MergeResult
    key: str

    @property
    def path(self) -> Path:
        return self.result.path

    def to_json(self, folder: str) -> dict[str, Any]:
        merged = self.result
        return {
            "path": folder,
            "merged_tensors": merged.merged_tensors,
            "total_tensors": merged.total_tensors,
            "dtype": merged.dtype,
            "shards": merged.shards,
            "max_abs": merged.max_abs,
            "coverage": merged.coverage,
        }

    def precision(self) -> dict[str, Any]:
        """What precision the merge and the converter wrote in, and why (the manifest's "precision")."""
        merged = self.result
        return {
            "merged": merged.dtype,
            "gguf": merged.gguf_ftype,
            "why": merged.dtype_reason,
            "fits_float16": merged.fits_float16,
        }


@dataclass(frozen=True)
class BuiltGGUF:
    """A GGUF in the output (its artifact record) and the key of the stage that built it."""

    artifact: GGUFArtifact
    key: str
    cached: Path  # the file in the stage cache (the output is a hard link to it)
    header: GGUFHeader

    @property
    def path(self) -> Path:
        return self.artifact.path
