"""A runtime-LoRA export's finish: its manifest and result, from the typed records its stages returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.deploy.serve_config import adapter_refused_note
from exporter.engine.command import write_manifest
from exporter.engine.stage_cache import CacheEntry
from exporter.graphs.export_manifest import mmproj_section
from exporter.graphs.runtime_stages import RuntimeDeployment, RuntimeQuality, RuntimeStages
from exporter.inputs.manifest import RUNTIME_LORA_FORMAT
from exporter.inputs.records import BuiltGGUF
from exporter.merge.runtime_adapter import base_identity
from exporter.quality.reference import PairQuality
from exporter.stages.gguf import GGUF_FILE
from exporter.stages.lora import RuntimeAdapter


@dataclass
class RuntimeLoraResult:
    out: Path
    base_name: str
    bases: dict[str, Path]
    adapters: list[RuntimeAdapter]
    modelfiles: list[Path]
    manifest: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    quality: list[PairQuality] = field(default_factory=list)
    floors: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    serve_configs: list[Path] = field(default_factory=list)  # llama-server: one base, every adapter

    @property
    def passed(self) -> bool:
        return all(q.passed for q in self.quality)


@dataclass(frozen=True)
class RuntimeRecords:
    """What one runtime-LoRA export's stages returned, the manifest's sources."""

    base: CacheEntry  # the unmerged base's 16-bit GGUF, in the stage cache
    bases: dict[str, BuiltGGUF]  # profile name -> its quantized base
    adapters: list[RuntimeAdapter]
    deployment: RuntimeDeployment
    merged: dict[str, dict[str, BuiltGGUF]]  # --compare-merged: adapter -> profile -> its merged GGUF
    quality: RuntimeQuality | None
    mmproj: BuiltGGUF | None = None  # a vision-language base's projector


def runtime_sections(s: RuntimeStages, records: RuntimeRecords) -> dict[str, Any]:
    """The manifest's own sections of a runtime-LoRA export, in the order written."""
    layout, entry, chats = s.layout, records.base, records.deployment.chats
    sections: dict[str, Any] = {
        "base_identity": base_identity(entry.path / GGUF_FILE, entry.meta["files"][GGUF_FILE]),
        "bases": [b.artifact.to_json(layout.out) for b in records.bases.values()],
        "adapters": [a.to_json() for a in records.adapters],
        "modelfiles": [
            {
                "path": layout.modelfile(n, p.name).name,
                "adapter": n,
                "profile": p.name,
                "chat_template_family": chats[n].spec.family,
            }
            for n in layout.adapter_names
            for p in layout.profiles
            if records.deployment.modelfiles
        ],  # fmt: skip
        "ollama": {n: c.choice.to_json() for n, c in chats.items()},
        "llama_server": [c.name for c in records.deployment.serve_configs],
    }
    if records.mmproj is not None:
        sections["mmproj"] = mmproj_section(records.mmproj, layout.out)
    if s.options.check and s.options.compare_merged:
        sections["merged"] = [
            {
                "adapter": n,
                "artifacts": [
                    records.merged[n][p.name].artifact.to_json(layout.out) for p in layout.profiles
                ],
            }
            for n in layout.adapter_names
        ]
    return sections


def finish_runtime(s: RuntimeStages, records: RuntimeRecords, order: list[str]) -> RuntimeLoraResult:
    """Write the manifest of a runtime-LoRA export whose stages all finished (`order`: its graph's nodes)."""
    layout, run, options = s.layout, s.run, s.options
    quality = records.quality or RuntimeQuality([], {}, [])
    passed = all(q.passed for q in quality.pairs)
    path, cached = write_manifest(
        run,
        order,
        RUNTIME_LORA_FORMAT,
        layout.base_name,
        {
            "profiles": [b.artifact.profile for b in records.bases.values()],
            "threads": options.run.threads,
            "profile_files": [str(p) for p in options.profiles.files],
            "cache": options.run.use_cache,
            "allow_pickle": options.inputs.allow_pickle,
        },
        {"base": s.inputs.to_json()["base"], "adapters": s.inputs.adapter_records()},
        runtime_sections(s, records),
        quality=None if records.quality is None else {"report": "report.json", "passed": passed},
    )
    deployment = records.deployment
    notes = sorted({c.spec.note for c in deployment.chats.values() if c.spec.note})
    if not deployment.modelfiles:
        notes.append(adapter_refused_note(options.output.ollama.text))
    return RuntimeLoraResult(
        layout.out, layout.base_name, {n: b.path for n, b in records.bases.items()}, records.adapters,
        deployment.modelfiles, path, dict(run.seconds), cached, quality.pairs, quality.floors, quality.reports,
        notes, deployment.serve_configs,
    )  # fmt: skip
