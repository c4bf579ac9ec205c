"""The stages of one merged export as its graph runs them: each from the typed records of the stages it
needs to its own record, in an open run (exporter/stages/ does the work; this says with what)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.stop_tokens import StopCheck
from exporter.core.faults import kill_point
from exporter.core.units import human_size
from exporter.deploy.serve_config import ServeConfig
from exporter.engine.run import Run
from exporter.engine.stage_keys import mmproj_key
from exporter.graphs.export import ExportLayout
from exporter.inputs.options import ExportOptions, QualityOptions
from exporter.inputs.records import BuiltGGUF, MergedModel, ModelInputs
from exporter.inputs.safetensors_header import gguf_source_ftype
from exporter.inputs.tokenizer_files import tokenizer_size
from exporter.quality.imatrix import ImatrixStage
from exporter.quality.reference import ArtifactQuality, Reference
from exporter.quality.tokenizer_parity import ParityReport, check_embedded_chat_template
from exporter.quality.vision import ImageReference, with_image_floor
from exporter.stages.chat import ChatRecord, chat_stage, parity_stage, report_template_choice
from exporter.stages.fit import FitRecord, fit_stage, search_windows
from exporter.stages.gguf import convert_merged, merged_convert_key, mmproj_stage, quantize_from
from exporter.stages.images import image_reference_stage, with_image_scores
from exporter.stages.imatrix import computed_imatrix_stage, given_imatrix_stage
from exporter.stages.merge import MERGED_DIR, check_float16_range, merge_stage, release_weights
from exporter.stages.modelfiles import write_modelfiles, write_serve_configs
from exporter.stages.qlora import QloraChoice
from exporter.stages.quality import (
    QualitySummary,
    floor_stage,
    judged,
    reference_stage,
    score_stage,
    write_quality_report,
)
from exporter.stages.stops import stops_stage
from quant_profiles import ProfileRegistry, QuantProfile


@dataclass(frozen=True)
class Deployed:
    """The Modelfiles and llama-server configs written, one of each per profile."""

    modelfiles: list[Path]
    serve_configs: list[Path]


@dataclass(frozen=True)
class ExportStages:
    """One merged export's stages in its open run. `choice`, a QLoRA adapter's chosen merge base: the
    merge reads its kept inputs; the references and the manifest keep `inputs`."""

    run: Run
    inputs: ModelInputs
    layout: ExportLayout
    registry: ProfileRegistry
    options: ExportOptions
    quality: QualityOptions

    def merge(self, choice: QloraChoice | None) -> MergedModel:
        inputs = choice.kept_inputs if choice else self.inputs
        merged = merge_stage(
            self.run,
            inputs,
            self.options.dtype,
            self.layout.name,
            self.layout.out / MERGED_DIR,
            weights_needed=self._weights_needed,
        )
        check_float16_range(merged, self.layout.profiles, self.inputs.base_dir)
        return merged

    def _weights_needed(self, merge_key: str, meta: dict[str, Any]) -> bool:
        """Whether the merged weights are wanted: by --keep-merged, by the conversion when its GGUF is not
        cached, by an importance matrix computed from --calibration."""
        if self.options.keep_merged or self.options.calibration is not None:
            return True
        key = merged_convert_key(self.run, merge_key, gguf_source_ftype(meta["dtype"]), self.layout.name)
        if self.layout.mmproj_type is not None:
            projector = mmproj_key(
                merge_key, self.run.vendored.commit, self.layout.mmproj_type.lower(), self.layout.name
            )
            if self.run.cache.lookup("mmproj", projector) is None:
                return True
        return self.run.cache.lookup("convert", key) is None

    def release_merged(self, merged: MergedModel) -> None:
        """The merged weights given up once the 16-bit GGUF holds them (unless --keep-merged)."""
        freed = release_weights(self.run, merged)
        if freed:
            self.run.report(
                f"released the merged weights ({human_size(freed)}): the {merged.result.gguf_ftype} GGUF holds "
                "them (--keep-merged keeps them)"
            )

    def chat(self, merged: MergedModel) -> ChatRecord:
        chat = chat_stage(self.run, merged.key, merged.path, self.options.output.ollama)
        report_template_choice(self.run, chat)
        return chat

    def convert(self, merged: MergedModel) -> BuiltGGUF:
        ftype = merged.result.gguf_ftype
        if self.options.output.force:  # an earlier export of this name may have converted to the other type
            for stale in self.layout.other_sources(ftype):
                stale.unlink(missing_ok=True)
        target = self.layout.gguf(ftype)
        return convert_merged(
            self.run,
            "convert",
            merged,
            self.layout.name,
            target,
            self.registry.get(ftype),
            self.inputs.base_dir,
        )

    def mmproj(self, merged: MergedModel) -> BuiltGGUF:
        target, kind = self.layout.mmproj, self.layout.mmproj_type
        assert target is not None and kind is not None
        return mmproj_stage(self.run, merged.path, merged.key, self.layout.name, target, kind)

    def imatrix(self, merged: MergedModel, f16: BuiltGGUF) -> ImatrixStage:
        name, options = self.layout.name, self.options
        if options.imatrix is not None:
            return given_imatrix_stage(self.run, options.imatrix, f16.path, f16.key, name)
        assert options.calibration is not None
        return computed_imatrix_stage(
            self.run, options.calibration, options.calibration_tokens, merged.path, f16.path, f16.key, name
        )

    def quantize(self, profile: QuantProfile, f16: BuiltGGUF, imatrix: ImatrixStage | None) -> BuiltGGUF:
        target = self.layout.gguf(profile.name)
        return quantize_from(self.run, f"quantize:{profile.name}", f16, profile, target, imatrix)

    def fit(self, f16: BuiltGGUF, reference: Reference, imatrix: ImatrixStage | None) -> FitRecord:
        fit, label = self.options.fit, self.layout.fit_label
        assert fit is not None and label is not None
        target = self.layout.profile_file(label)
        return fit_stage(self.run, fit, f16, reference, imatrix, self.registry, self.quality, target)

    def parity(self, merged: MergedModel, f16: BuiltGGUF) -> ParityReport:
        new_from = tokenizer_size(self.inputs.base_dir)  # the tokens an adapter added come after the base's
        return parity_stage(self.run, f16.key, merged.path, f16.path, new_from=new_from)

    def templates(self, merged: MergedModel, chat: ChatRecord, ggufs: list[BuiltGGUF]) -> None:
        self.run.report("checking each GGUF's chat template against the merged model's")
        headers = {g.path: g.header for g in ggufs}
        check_embedded_chat_template(chat.template, merged.path, list(headers), headers)

    def modelfiles(
        self, chat: ChatRecord, quantized: dict[str, BuiltGGUF], mmproj: BuiltGGUF | None = None
    ) -> Deployed:
        spec, layout = chat.spec, self.layout
        targets = {
            layout.modelfile(label): (built.path, f"{layout.name} ({label})")
            for label, built in quantized.items()
        }
        self.run.report("writing Modelfiles")
        kill_point("modelfiles")
        projector = None if mmproj is None else mmproj.path
        written = write_modelfiles(
            self.run, targets, spec, layout.out / MERGED_DIR, choice=chat.choice, projector=projector
        )
        num_ctx = spec.parameters.get("num_ctx")
        configs = {
            layout.serve_config(label): ServeConfig(
                built.path, num_ctx, llama_cpp_commit=self.run.vendored.commit, mmproj=projector
            )
            for label, built in quantized.items()
        }
        return Deployed(written, write_serve_configs(self.run, configs))

    def stops(self, chat: ChatRecord, quantized: dict[str, BuiltGGUF]) -> dict[str, StopCheck]:
        if chat.stop_prompt is None:
            return {}
        ggufs = {label: built.artifact for label, built in quantized.items()}
        checks = stops_stage(
            self.run, {n: (a.path, a.sha256) for n, a in ggufs.items()}, chat.terminator, chat.stop_prompt
        )
        for label, check in checks.items():
            self.run.report(check.summary(ggufs[label].path.name))
        return checks

    def reference(self, merged: MergedModel, f16: BuiltGGUF, choice: QloraChoice | None) -> Reference:
        kill_point("check")
        self.run.report("checking quality against the unmerged reference")
        # A dequant merge base is the model as trained, so it is judged against that model's reference.
        kept = choice.decision if choice else None
        # --dequantize-base: the unpacked 4-bit base's weights are those the adapter was trained on.
        draft = f16.path  # its greedy answers, which the reference confirms rather than decodes
        if choice is not None and choice.four_bit_base is not None:
            return reference_stage(
                self.run, self.inputs, merged.path, self.quality, "reference:as-trained", draft=draft
            )
        if kept is not None and kept.chosen == "dequant":
            return reference_stage(
                self.run,
                self.inputs,
                merged.path,
                self.quality,
                "reference:as-trained",
                kept.trained_on,
                draft,
            )
        return reference_stage(self.run, self.inputs, merged.path, self.quality, draft=draft)

    def score(
        self,
        profile: QuantProfile | None,
        reference: Reference,
        f16: BuiltGGUF,
        built: BuiltGGUF | None,
        merged: MergedModel | None = None,
        images: tuple[ImageReference | str, BuiltGGUF] | None = None,
    ) -> ArtifactQuality | None:
        """The unquantized GGUF (`profile` None) or a profile's GGUF judged against the reference. An
        unquantized GGUF that fails its gates gets the 16-bit floor of `merged` (its "rounding_floor"), which
        tells rounding from conversion in the diagnosis. `images`: a vision-language model's reference on the
        image rows (or why there is none) and its projector, with which the GGUF is also scored on images."""
        if profile is not None and profile.is_source(f16.artifact.profile):
            return None  # scored once, as the unquantized GGUF
        a = (f16 if built is None else built).artifact
        name = f"quality:{'source' if profile is None else profile.name}"
        held_out = search_windows(reference)[1] if self.options.fit else None
        metrics = score_stage(self.run, name, reference, a.path, a.sha256, self.quality, held_out=held_out)
        if images is not None:
            projector = images[1].artifact
            pair = (projector.path, projector.sha256)
            metrics = with_image_scores(
                self.run, name, metrics, images[0], a.path, a.sha256, pair, self.quality
            )
        fitted = profile is not None and profile.name == a.profile and profile.name == self.layout.fit_label
        label_profile = profile if fitted and profile is not None else self.registry.get(a.profile)
        quality = judged(
            a.profile, a.path, a.size_bytes, a.bits_per_weight, metrics, label_profile, self.quality
        )
        if merged is not None and not quality.passed and "error" not in metrics:
            quality.metrics["rounding_floor"] = floor_stage(
                self.run, merged.key, merged.path, reference, self.quality
            )
        return quality

    def images(self) -> ImageReference | str:
        """The unmerged model's answers on the image rows, or why there are none."""
        images = image_reference_stage(self.run, self.inputs, self.quality)
        if isinstance(images, str):
            self.run.report(images)
        return images

    def report(
        self,
        reference: Reference,
        scored: list[ArtifactQuality | None],
        choice: QloraChoice | None,
        fit: FitRecord | None = None,
        images: ImageReference | str | None = None,
    ) -> QualitySummary:
        items = [q for q in scored if q is not None]
        items.sort(key=lambda item: -item.size_bytes)  # largest (closest to the fine-tune) first
        extra = {"merge_base": choice.section(self.run.seconds)} if choice else {}
        if fit is not None:
            extra["fit"] = fit.section()
        reference, seen = with_image_floor(reference, images)
        extra.update(seen)
        return write_quality_report(
            self.run, self.layout.name, self.inputs, reference, self.quality, items, extra
        )
