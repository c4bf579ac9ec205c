"""The stages of one runtime-LoRA export as its graph runs them: each from the typed records of the stages
it needs to its own record, in an open run (exporter/stages/ does the work; this says with what)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.core.faults import kill_point
from exporter.deploy.serve_config import ServeConfig, ServedAdapter
from exporter.engine.run import Run
from exporter.engine.stage_cache import CacheEntry
from exporter.engine.stage_keys import convert_base_key
from exporter.graphs.compare_merged import MergedScore
from exporter.graphs.runtime import RuntimeLayout
from exporter.inputs.adapter import LoraAdapter, tokenizer_source
from exporter.inputs.options import QualityOptions, RuntimeLoraOptions
from exporter.inputs.records import BuiltGGUF, ModelInputs
from exporter.merge.runtime_adapter import ScaleCorrection, base_identity, base_uuid, check_pair
from exporter.quality.reference import PairQuality, Reference
from exporter.quality.report import RUNTIME_REPORT_FILES, write_runtime_reports
from exporter.quality.vision import ImageReference
from exporter.stages.chat import ChatRecord, chat_record, resolve_chat
from exporter.stages.gguf import GGUF_FILE, convert_stage, mmproj_stage, publish_gguf, quantize_stage
from exporter.stages.images import image_reference_stage, with_image_scores
from exporter.stages.lora import RuntimeAdapter, lora_stage
from exporter.stages.modelfiles import write_modelfiles, write_serve_configs
from exporter.stages.quality import judged, reference_stage, score_stage
from quant_profiles import ProfileRegistry, QuantProfile


@dataclass(frozen=True)
class RuntimeDeployment:
    """The Modelfiles written (none where the target Ollama refuses ADAPTER), each adapter's chat
    template, and the llama-server configs (one per profile: the base with every adapter)."""

    modelfiles: list[Path]
    chats: dict[str, ChatRecord]
    serve_configs: list[Path]


@dataclass(frozen=True)
class RuntimeQuality:
    """Every base + adapter pair judged (with its merged comparison), each adapter's base floor, the reports."""

    pairs: list[PairQuality]
    floors: dict[str, dict[str, Any]]
    reports: list[Path]


@dataclass(frozen=True)
class RuntimeStages:
    """One runtime-LoRA export's stages in its open run."""

    run: Run
    inputs: ModelInputs
    layout: RuntimeLayout
    registry: ProfileRegistry
    options: RuntimeLoraOptions
    quality: QualityOptions
    adapters: dict[str, tuple[LoraAdapter, ScaleCorrection]]  # adapter name -> it, and its correction
    source: str  # the base GGUF's type
    identity_uuid: str
    convert_key: str

    @classmethod
    def of(
        cls,
        run: Run,
        inputs: ModelInputs,
        layout: RuntimeLayout,
        registry: ProfileRegistry,
        options: RuntimeLoraOptions,
        quality: QualityOptions,
        corrections: list[ScaleCorrection],
        source: str,
    ) -> RuntimeStages:
        adapters = dict(
            zip(layout.adapter_names, zip(inputs.adapters, corrections, strict=True), strict=True)
        )
        identity_uuid = base_uuid(inputs.base_files)
        key = convert_base_key(
            inputs.base_files, run.vendored.commit, source.lower(), layout.base_name, identity_uuid
        )
        return cls(run, inputs, layout, registry, options, quality, adapters, source, identity_uuid, key)

    def convert_base(self) -> CacheEntry:
        metadata = {"general.uuid": self.identity_uuid}
        profile = self.registry.get(self.source)
        entry = convert_stage(
            self.run,
            "convert-base",
            self.convert_key,
            self.inputs.base_dir,
            self.layout.base_name,
            profile,
            None,
            metadata,
        )
        assert isinstance(entry, CacheEntry)
        return entry

    def quantize_base(self, profile: QuantProfile, entry: CacheEntry) -> BuiltGGUF:
        target = self.layout.base(profile.name)
        if profile.is_source(self.source):
            return publish_gguf(self.run, entry, target, profile)
        source = entry.path / GGUF_FILE
        name = f"quantize:{profile.name}"
        return quantize_stage(self.run, name, source, self.convert_key, profile, target, runtime_base=True)

    def lora(self, name: str, entry: CacheEntry) -> RuntimeAdapter:
        identity = base_identity(entry.path / GGUF_FILE, entry.meta["files"][GGUF_FILE])
        adapter, correction = self.adapters[name]
        files = self.inputs.adapter_files[self.inputs.adapters.index(adapter)]
        return lora_stage(
            self.run, name, adapter, files, correction, self.inputs.base_dir, self.convert_key, identity,
            self.layout.adapter(name),
        )  # fmt: skip

    def mmproj(self) -> BuiltGGUF:
        """The base's projector: a runtime adapter changes the language model only (it is refused otherwise)."""
        target, kind = self.layout.mmproj, self.layout.mmproj_type
        assert target is not None and kind is not None
        return mmproj_stage(
            self.run, self.inputs.base_dir, self.convert_key, self.layout.base_name, target, kind
        )

    def modelfiles(
        self, bases: dict[str, BuiltGGUF], loras: dict[str, RuntimeAdapter], mmproj: BuiltGGUF | None = None
    ) -> RuntimeDeployment:
        kill_point("modelfiles")
        target = self.options.output.ollama
        written: list[Path] = []
        chats = {
            n: chat_record(resolve_chat(tokenizer_source([a], self.inputs.base_dir), target))
            for n, (a, _) in self.adapters.items()
        }
        projector = None if mmproj is None else mmproj.path
        serve = self.serve_configs(bases, loras, chats, projector)
        if not target.accepts_adapter:
            return RuntimeDeployment(written, chats, serve)
        self.run.report("writing Modelfiles")
        base_name = self.layout.base_name
        for name in self.adapters:
            spec = chats[name].spec
            targets = {
                self.layout.modelfile(name, label): (
                    base.path,
                    f"{name} ({label}, runtime adapter on {base_name}; if your Ollama rejects ADAPTER, use the "
                    "merged Modelfile from merge-quantize)",
                )
                for label, base in bases.items()
            }
            written += write_modelfiles(
                self.run, targets, spec, self.inputs.base_dir, loras[name].gguf, chats[name].choice, projector
            )
        return RuntimeDeployment(written, chats, serve)

    def serve_configs(
        self,
        bases: dict[str, BuiltGGUF],
        loras: dict[str, RuntimeAdapter],
        chats: dict[str, ChatRecord],
        projector: Path | None = None,
    ) -> list[Path]:
        """One llama-server config per profile: the quantized base with every adapter, none applied."""
        self.run.report("writing llama-server configs")
        adapters = tuple(ServedAdapter(n, loras[n].gguf) for n in self.layout.adapter_names)
        num_ctx = next(iter(chats.values())).spec.parameters.get("num_ctx")
        configs = {
            self.layout.serve_config(label): ServeConfig(
                base.path, num_ctx, adapters, self.run.vendored.commit, mmproj=projector
            )
            for label, base in bases.items()
        }
        return write_serve_configs(self.run, configs)

    def reference(self, name: str) -> Reference:
        kill_point("check")
        adapter, _correction = self.adapters[name]
        tokenizer_dir = tokenizer_source([adapter], self.inputs.base_dir)
        only = self.inputs.only(adapter)
        return reference_stage(self.run, only, tokenizer_dir, self.quality, name=f"reference:{name}")

    def images(self, name: str) -> ImageReference | str:
        """One adapter's unmerged model on the image rows, or why there are none."""
        adapter, _correction = self.adapters[name]
        images = image_reference_stage(
            self.run, self.inputs.only(adapter), self.quality, name=f"reference:{name}:images"
        )
        if isinstance(images, str):
            self.run.report(images)
        return images

    def score_pair(
        self,
        name: str,
        profile: QuantProfile,
        reference: Reference,
        base: BuiltGGUF,
        lora: RuntimeAdapter,
        images: tuple[ImageReference | str, BuiltGGUF] | None = None,
    ) -> PairQuality:
        check_pair(lora.gguf, base.path)
        metrics = score_stage(
            self.run,
            f"quality:{name}:{profile.name}",
            reference,
            base.path,
            base.artifact.sha256,
            self.quality,
            lora=(lora.gguf, lora.sha256),
        )
        if images is not None:
            projector = images[1].artifact
            metrics = with_image_scores(
                self.run,
                f"quality:{name}:{profile.name}",
                metrics,
                images[0],
                base.path,
                base.artifact.sha256,
                (projector.path, projector.sha256),
                self.quality,
                lora=(lora.gguf, lora.sha256),
            )
        size = base.artifact.size_bytes + lora.size_bytes
        judged_pair = judged(profile.name, base.path, size, None, metrics, profile, self.quality)
        return PairQuality(name, profile.name, judged_pair)

    def report(
        self,
        pairs: list[PairQuality],
        merged: list[MergedScore],
        references: dict[str, Reference],
        images: dict[str, ImageReference | str] | None = None,
    ) -> RuntimeQuality:
        by_pair = {(n, p): q for n, p, q in merged}
        for pair in pairs:
            pair.merged = by_pair.get((pair.adapter, pair.profile))
        floors = {n: reference.base_metrics for n, reference in references.items()}
        for n, seen in (images or {}).items():  # the base's distance on the image rows: the adapter's effect
            if isinstance(seen, ImageReference):
                floors[n] = {**floors[n], **seen.base_metrics}
        for report_file in RUNTIME_REPORT_FILES:
            self.run.guard.claim(self.layout.out / report_file)
        reports = write_runtime_reports(self.layout.out, self.layout.base_name, pairs, floors)
        return RuntimeQuality(pairs, floors, reports)
