"""A merged export's finish: its manifest and result, from the typed records its stages returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.stop_tokens import StopCheck
from exporter.engine.command import write_manifest
from exporter.graphs.export_stages import Deployed, ExportStages
from exporter.inputs.artifacts import GGUFArtifact
from exporter.inputs.manifest import EXPORT_FORMAT
from exporter.inputs.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.quality.imatrix import ImatrixStage
from exporter.quality.tokenizer_parity import ParityReport
from exporter.stages.chat import ChatRecord, parity_to_json
from exporter.stages.fit import FitRecord
from exporter.stages.merge import MERGED_DIR
from exporter.stages.qlora import QloraChoice
from exporter.stages.quality import QualitySummary
from exporter.stages.stops import stops_to_json


@dataclass
class ExportResult:
    out: Path
    name: str
    artifacts: list[GGUFArtifact]  # one per requested profile
    modelfiles: list[Path]
    manifest: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: QualitySummary | None = None
    imatrix: ImatrixStage | None = None
    merge_base: dict[str, Any] | None = None  # a QLoRA adapter's merge-base choice (both candidates)
    serve_configs: list[Path] = field(default_factory=list)  # llama-server launch configs
    mmproj: GGUFArtifact | None = None  # a vision-language model's projector


@dataclass(frozen=True)
class ExportRecords:
    """What one merged export's stages returned, the manifest's sources."""

    choice: QloraChoice | None  # a QLoRA adapter's merge-base choice
    merged: MergedModel
    chat: ChatRecord
    f16: BuiltGGUF
    imatrix: ImatrixStage | None
    mmproj: BuiltGGUF | None  # a vision-language model's projector
    fit: FitRecord | None
    quantized: dict[str, BuiltGGUF]  # profile name (or the fitted profile's) -> its GGUF
    parity: ParityReport
    deployed: Deployed
    stops: dict[str, StopCheck]
    summary: QualitySummary | None

    @property
    def artifacts(self) -> list[GGUFArtifact]:
        return [built.artifact for built in self.quantized.values()]


def export_sections(s: ExportStages, records: ExportRecords) -> dict[str, Any]:
    """The manifest's own sections of a merged export, in the order written."""
    out, chat = s.layout.out, records.chat
    sections: dict[str, Any] = {
        "merge": {
            **records.merged.to_json(MERGED_DIR),
            "weights": "kept (--keep-merged)"
            if s.options.keep_merged
            else f"released once the {records.f16.artifact.profile} GGUF held them; {MERGED_DIR}/ keeps the config, "
            "tokenizer and chat template (--keep-merged keeps the weights)",
        },
        "precision": records.merged.precision(),
        "intermediates": [records.f16.artifact.to_json(out)],
        "artifacts": [a.to_json(out) for a in records.artifacts],
        "modelfiles": [
            {
                "path": m.name,
                "chat_template_family": chat.spec.family,
                "stops": list(chat.spec.stops),
                "verified_conversations": chat.spec.verified_conversations,
            }
            for m in records.deployed.modelfiles
        ],
        "tokenizer_parity": records.parity.to_json(),
        "ollama": chat.choice.to_json(),
        "llama_server": [c.name for c in records.deployed.serve_configs],
        "stops": stops_to_json(records.stops),
        "llama_cpp_chat_template": None if chat.jinja is None else parity_to_json(chat.jinja),
    }
    if records.mmproj is not None:
        sections["mmproj"] = mmproj_section(records.mmproj, out)
    if records.imatrix is not None:
        sections["imatrix"] = records.imatrix.to_json(out)
    if records.fit is not None:
        fit = records.fit
        sections["fit"] = {
            **fit.section(),
            "profile_file": {
                "path": fit.profile_file.name,
                "sha256": s.run.cache.hashes.sha256(fit.profile_file),
            },
            "overrides": fit.profile.overrides.model_dump(mode="json"),
            "reproduce": f"--profile-file {fit.profile_file.name} --profile {fit.profile.name}",
        }
    if records.choice is not None:
        sections["merge_base"] = records.choice.section(s.run.seconds)
    return sections


def mmproj_section(mmproj: BuiltGGUF, out: Path) -> dict[str, Any]:
    """The projector's record: its file and hash, and what loads it beside each language-model GGUF."""
    return {
        **mmproj.artifact.to_json(out),
        "loaded_by": "llama-server --mmproj, libmtmd, and a second FROM line in each Modelfile",
    }


def finish_export(s: ExportStages, records: ExportRecords, order: list[str]) -> ExportResult:
    """Write the manifest of a merged export whose stages all finished (`order`: its graph's nodes)."""
    chat, parity, run = records.chat, records.parity, s.run
    sections = export_sections(s, records)
    notes = [n for n in (chat.spec.note, None if parity.passed else parity.summary()) if n]
    notes += [c.summary(label) for label, c in records.stops.items() if not c.passed]
    notes += [chat.choice.llama_server_note] if chat.choice.llama_server_note else []
    run.report(parity.summary())
    summary = records.summary
    path, _ = write_manifest(
        run,
        order,
        EXPORT_FORMAT,
        s.layout.name,
        manifest_options(s, records),
        inputs_record(s, records.choice),
        sections,
        [chat.spec.note] if chat.spec.note else [],
        None if summary is None else {"report": "report.json", "passed": summary.passed},
    )
    return ExportResult(
        s.layout.out,
        s.layout.name,
        records.artifacts,
        records.deployed.modelfiles,
        path,
        dict(run.seconds),
        notes,
        summary,
        records.imatrix,
        None if records.choice is None else sections["merge_base"],
        records.deployed.serve_configs,
        None if records.mmproj is None else records.mmproj.artifact,
    )


def inputs_record(s: ExportStages, choice: QloraChoice | None) -> dict[str, Any]:
    """The manifest's "inputs": a 4-bit base (--dequantize-base) as given, with the folder it became."""
    record = s.inputs.to_json()
    four_bit = choice.four_bit_base if choice else None
    if four_bit is not None:
        given = ModelInputs.hashed(four_bit, (), s.run.cache.hashes)
        record["base"] = {**given.to_json()["base"], "dequantized": record["base"]}
    return record


def manifest_options(s: ExportStages, records: ExportRecords) -> dict[str, Any]:
    options = s.options
    return {
        "profiles": [a.profile for a in records.artifacts],
        "dtype": records.merged.result.dtype,
        "threads": options.run.threads,
        "profile_files": [str(p) for p in options.profiles.files],
        "cache": options.run.use_cache,
        "keep_merged": options.keep_merged,
        "allow_pickle": options.inputs.allow_pickle,
        "trust_remote_code": options.inputs.trust_remote_code,
        "reference_dtype": s.quality.reference_dtype,
        "merge_base": None if records.choice is None else records.choice.decision.mode,
        "fit": None
        if options.fit is None
        else {"budget": options.fit.text, "max_trials": options.fit.max_trials},
    }
