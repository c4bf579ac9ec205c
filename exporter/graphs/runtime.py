"""One runtime-LoRA export before its run opens: where its outputs go, and the checks that need no run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter.core.errors import InputError
from exporter.core.paths import refuse_output_in_inputs
from exporter.deploy.serve_config import SERVE_SUFFIX
from exporter.engine.preflight import preflight
from exporter.engine.run import Reporter, Run, check_output
from exporter.inputs.adapter import LoraAdapter
from exporter.inputs.base_config import read_base_config
from exporter.inputs.image_rows import load_image_rows
from exporter.inputs.manifest import MANIFEST
from exporter.inputs.options import QualityOptions, RuntimeLoraOptions
from exporter.inputs.profiles import requested_profiles
from exporter.inputs.records import read_inputs, sanitize_name
from exporter.inputs.safetensors_header import choose_merge_dtype, gguf_source_ftype, read_header
from exporter.inputs.tokenizer_files import gguf_name_error
from exporter.inputs.vision import is_vision_language, vision_tensors
from exporter.merge.runtime_adapter import ScaleCorrection, runtime_correction
from exporter.quality.report import RUNTIME_REPORT_FILES
from exporter.stages.chat import locate_llama_tools_commit
from exporter.stages.merge import MERGED_DIR
from quant_profiles import ProfileRegistry, QuantProfile


@dataclass(frozen=True)
class RuntimeLayout:
    out: Path
    base_name: str
    adapter_names: tuple[str, ...]
    profiles: tuple[QuantProfile, ...]
    mmproj_type: str | None = None  # a vision-language base: its projector's type (F16, Q8_0)

    @property
    def mmproj(self) -> Path | None:
        """A vision-language base's projector, shared by every adapter: <out>/<base>-mmproj-<TYPE>.gguf."""
        return (
            None
            if self.mmproj_type is None
            else self.out / f"{self.base_name}-mmproj-{self.mmproj_type}.gguf"
        )

    def base(self, profile: str) -> Path:
        return self.out / f"{self.base_name}-{profile}.gguf"

    def adapter(self, name: str) -> Path:
        return self.out / f"{name}.lora.gguf"

    def modelfile(self, name: str, profile: str) -> Path:
        return self.out / f"{name}-{profile}.Modelfile"

    def merged(self, name: str) -> Path:
        return self.out / MERGED_DIR / name

    def serve_config(self, profile: str) -> Path:
        return self.out / f"{self.base_name}-{profile}{SERVE_SUFFIX}"

    @property
    def planned(self) -> list[Path]:
        return [
            self.out / MANIFEST,
            *(self.out / report_file for report_file in RUNTIME_REPORT_FILES),
            self.out / MERGED_DIR,
            *(self.base(p.name) for p in self.profiles),
            *(self.adapter(n) for n in self.adapter_names),
            *(self.modelfile(n, p.name) for n in self.adapter_names for p in self.profiles),
            *(self.serve_config(p.name) for p in self.profiles),
            *([self.mmproj] if self.mmproj else []),
        ]


@dataclass(frozen=True)
class PreparedRuntime:
    """What a runtime-LoRA export is, read and checked before its run opens."""

    options: RuntimeLoraOptions
    vendored: VendoredLlamaCpp
    registry: ProfileRegistry
    profiles: list[QuantProfile]
    adapters: list[LoraAdapter]
    base_dir: Path
    layout: RuntimeLayout
    corrections: list[ScaleCorrection]
    source: str  # the base GGUF's type: F16, or BF16 for a bfloat16 base beyond float16's range

    def check_output(self) -> None:
        check_output(self.layout.out, self.layout.planned, self.options.output.force, MANIFEST)

    @property
    def finished_files(self) -> list[Path]:
        return self.layout.planned[: 1 + len(RUNTIME_REPORT_FILES)]

    def in_run(self, run: Run) -> PreparedRuntime:
        return self

    def preflight(self, run: Run, report: Reporter) -> QualityOptions:
        """Every check before any work (see exporter.engine.preflight); the quality options it chose."""
        options = self.options
        merged = options.compare_merged and options.check
        return preflight(
            options, self.base_dir, self.adapters, self.profiles, run.vendored, report, None, merged
        )


def prepare_runtime(options: RuntimeLoraOptions) -> PreparedRuntime:
    """The checks of a runtime-LoRA export that need no run: the installation, the profiles, the inputs."""
    vendored = locate_vendored()  # a broken installation is reported before anything about the inputs
    locate_llama_tools_commit()  # llama.cpp's chat-template renderer checks every export's template
    registry, profiles = requested_profiles(options.profiles)
    for profile in profiles:
        if profile.needs_imatrix:
            raise InputError(
                f"Profile {profile.name} needs an importance matrix, which runtime-lora does not compute "
                "(the base is shared by every adapter, so no single adapter's data fits it). Choose a profile "
                "that does not need one (e.g. Q4_K_M; see `edge-export profiles`), or use merge-quantize "
                "--calibration FILE."
            )
    adapters, base_dir = read_inputs(options.inputs)
    vision = is_vision_language(read_base_config(base_dir))
    if vision:
        check_runtime_vision_adapters(adapters)
        if options.check:
            load_image_rows(options.quality.eval_data)
    names = tuple(sanitize_name(a.folder.resolve().name) for a in adapters)
    if len(set(names)) != len(names):
        raise InputError(
            f"Two --adapter folders have the same name ({', '.join(names)}); the adapter files are named after "
            "their folders. Rename or copy one of them."
        )
    layout = RuntimeLayout(
        options.output.out,
        sanitize_name(options.output.name or base_dir.resolve().name),
        names,
        tuple(profiles),
        options.output.mmproj_type if vision else None,
    )
    # the base GGUF bears the export's name; --compare-merged's merged GGUFs each adapter's
    named = [(layout.base_name, [base_dir])]
    if options.compare_merged:
        named += [(n, [a.path, base_dir]) for n, a in zip(names, adapters, strict=True)]
    for name, tokenizers in named:
        unloadable = gguf_name_error(name, tokenizers)
        if unloadable:
            raise InputError(unloadable)
    corrections = [runtime_correction(adapter, base_dir) for adapter in adapters]
    # The base converts as the merge would write it: float16 when it fits float16's range, else BF16
    # (a bfloat16 base holding larger values), never a silent overflow to Inf.
    source = gguf_source_ftype(choose_merge_dtype(base_dir, None).dtype)
    if source == "BF16" and any(p.ftype == "F16" for p in profiles):
        raise InputError(
            f"The bfloat16 base {base_dir} holds values beyond float16's range (±65504), so an F16 base "
            "would hold Inf there. Ask for --profile BF16 instead, or a quantized profile."
        )
    folders = [("base", base_dir), *(("adapter", a.folder) for a in adapters)]
    files = [
        ("evaluation data", options.quality.eval_data),
        *(("profile file", f) for f in options.profiles.files),
    ]
    refuse_output_in_inputs(layout.out, folders, files)  # before the output's lock is taken beside it
    return PreparedRuntime(
        options, vendored, registry, profiles, adapters, base_dir, layout, corrections, source
    )


def check_runtime_vision_adapters(adapters: list[LoraAdapter]) -> None:
    """Refuse an adapter that trains a vision tower or a projector: llama.cpp applies a runtime LoRA to the
    language model only (libmtmd loads none), so that part of the fine-tune would be lost."""
    for adapter in adapters:
        if adapter.weights.suffix != ".safetensors":
            continue
        trained = vision_tensors([entry.name for entry in read_header(adapter.weights)])
        if trained:
            raise InputError(
                f"{adapter.weights} trains the vision side of the model ({len(trained)} tensors, e.g. {trained[0]}), "
                "and llama.cpp applies a runtime LoRA to the language model only: the projector GGUF takes no "
                "adapter, so that part of the fine-tune would be lost. Export this adapter merged with "
                "merge-quantize (its vision tower and projector are merged into the mmproj GGUF), or train the "
                "adapter on the language model alone."
            )
