"""One merged export before its run opens: where its outputs go, and the checks that need no run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter.core.errors import InputError
from exporter.core.paths import refuse_output_in_inputs
from exporter.core.units import human_size
from exporter.deploy.serve_config import SERVE_SUFFIX
from exporter.engine.preflight import preflight
from exporter.engine.run import Reporter, Run, check_output
from exporter.inputs.adapter import LoraAdapter
from exporter.inputs.base_config import read_base_config
from exporter.inputs.image_rows import load_image_rows
from exporter.inputs.manifest import MANIFEST
from exporter.inputs.options import ExportOptions, QualityOptions
from exporter.inputs.profiles import requested_profiles
from exporter.inputs.records import ModelInputs, read_inputs, sanitize_name
from exporter.inputs.tokenizer_files import gguf_name_error
from exporter.inputs.trained_on import TrainedOn, resolve_trained_on
from exporter.inputs.vision import is_vision_language
from exporter.quality.fit import LADDER, estimated_reach
from exporter.quality.report import REPORT_FILES
from exporter.stages.chat import locate_llama_tools_commit
from exporter.stages.fit import PROFILE_SUFFIX
from exporter.stages.merge import MERGED_DIR
from exporter.stages.qlora import unpacked_base
from quant_profiles import ProfileRegistry, QuantProfile

SOURCE_FTYPES = ("F16", "BF16", "F32")


@dataclass(frozen=True)
class ExportLayout:
    """Where each output of one export goes: <out>/<name>-<PROFILE>.gguf, .Modelfile, merged/, …"""

    out: Path
    name: str
    profiles: tuple[QuantProfile, ...]
    has_imatrix: bool
    fit_label: str | None = None  # --fit: the fitted profile's name
    mmproj_type: str | None = None  # a vision-language base: the projector's type (F16, Q8_0)

    @property
    def labels(self) -> list[str]:
        """Every quantized file's label: the profiles', then the fitted one's."""
        return [p.name for p in self.profiles] + ([self.fit_label] if self.fit_label else [])

    def profile_file(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}{PROFILE_SUFFIX}"

    def gguf(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}.gguf"

    def modelfile(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}.Modelfile"

    def serve_config(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}{SERVE_SUFFIX}"

    @property
    def mmproj(self) -> Path | None:
        """A vision-language model's projector: <out>/<name>-mmproj-<TYPE>.gguf."""
        return None if self.mmproj_type is None else self.out / f"{self.name}-mmproj-{self.mmproj_type}.gguf"

    def other_sources(self, ftype: str) -> list[Path]:
        """The 16-bit GGUFs of the other source type, which an earlier export of this name may have
        converted to (and no profile asks for): a forced run removes them."""
        asked = {p.name for p in self.profiles}
        return [self.gguf(other) for other in SOURCE_FTYPES if other != ftype and other not in asked]

    @property
    def planned(self) -> list[Path]:
        return [
            self.out / MANIFEST,
            self.out / MERGED_DIR,
            *(self.gguf(ftype) for ftype in SOURCE_FTYPES),
            *(self.gguf(label) for label in self.labels),
            *([self.mmproj] if self.mmproj else []),
            *(self.modelfile(label) for label in self.labels),
            *(self.serve_config(label) for label in self.labels),
            *([self.profile_file(self.fit_label)] if self.fit_label else []),
            *(self.out / name for name in REPORT_FILES),
            *([self.out / f"{self.name}.imatrix.gguf"] if self.has_imatrix else []),
        ]


@dataclass(frozen=True)
class PreparedExport:
    """What an export is, read and checked before its run opens: profiles, inputs, output layout."""

    options: ExportOptions
    vendored: VendoredLlamaCpp
    registry: ProfileRegistry
    profiles: list[QuantProfile]
    adapters: list[LoraAdapter]
    base_dir: Path
    layout: ExportLayout
    trained_on: TrainedOn | None = None  # the adapter is a QLoRA adapter
    four_bit_base: Path | None = None  # --dequantize-base: the 4-bit base given; base_dir: its unpacking

    def check_output(self) -> None:
        check_output(self.layout.out, self.layout.planned, self.options.output.force, MANIFEST)

    @property
    def finished_files(self) -> list[Path]:
        """What a finished export's run replaces with --force: the manifest and the reports."""
        return [self.layout.out / MANIFEST, *(self.layout.out / name for name in REPORT_FILES)]

    def in_run(self, run: Run) -> PreparedExport:
        """The export in its open run: with --dequantize-base, the base is its dequantized weights."""
        if self.four_bit_base is None:
            return self
        unpacked = unpacked_base(run, ModelInputs.hashed(self.base_dir, (), run.cache.hashes))
        return replace(self, base_dir=unpacked)

    def preflight(self, run: Run, report: Reporter) -> QualityOptions:
        """Every check before any work (see exporter.engine.preflight); the quality options it chose."""
        options = self.options
        return preflight(
            options,
            self.base_dir,
            self.adapters,
            self.profiles,
            run.vendored,
            report,
            options.dtype,
            keeps_merged=options.keep_merged or options.check,  # the check may read them until the end
        )


def prepare_export(options: ExportOptions) -> PreparedExport:
    """The checks of an export that need no run: the installation, the profiles, the inputs."""
    vendored = locate_vendored()  # a broken installation is reported before anything about the inputs
    locate_llama_tools_commit()  # llama.cpp's chat-template renderer checks every export's template
    registry, profiles = requested_profiles(options.profiles, allow_none=options.fit is not None)
    check_fit_options(options, registry)
    for profile in profiles:
        if profile.needs_imatrix and not options.has_imatrix:
            raise InputError(
                f"Profile {profile.name} needs an importance matrix, and none can be computed without "
                "calibration data. Pass --calibration FILE (plain text, or JSONL chats from the adapter's "
                "domain) or --imatrix FILE (a matrix computed earlier), or choose a profile that does not "
                "need one (e.g. Q4_K_M; see `edge-export profiles`)."
            )
    adapters, base_dir = read_inputs(options.inputs)
    check_fit_reach(options, base_dir)
    trained_on = resolve_trained_on(options.qlora, base_dir, [a.path for a in adapters])
    if trained_on is not None:
        check_qlora_options(options, trained_on)
    name = sanitize_name(options.output.name or adapters[0].folder.resolve().name)
    unloadable = gguf_name_error(name, [a.folder for a in adapters] + [base_dir])
    if unloadable:
        raise InputError(unloadable)
    fit_label = options.fit.label if options.fit else None
    mmproj_type = options.output.mmproj_type if is_vision_language(read_base_config(base_dir)) else None
    if mmproj_type is not None and options.check:  # the image rows' files, before any work
        load_image_rows(options.quality.eval_data)
    if mmproj_type is not None and options.calibration is not None:
        raise InputError(
            f"--calibration computes an importance matrix on the merged model, which edge-export does not do "
            f"for a vision-language base yet ({base_dir / 'config.json'} has a vision_config). Drop "
            "--calibration (the K-quant profiles need no matrix), or pass one computed with llama-imatrix on "
            "the language model's GGUF with --imatrix."
        )
    layout = ExportLayout(
        options.output.out, name, tuple(profiles), options.has_imatrix, fit_label, mmproj_type
    )
    files = [
        ("evaluation data", options.quality.eval_data),
        ("calibration data", options.calibration),
        ("importance matrix", options.imatrix),
        *(("profile file", f) for f in options.profiles.files),
    ]
    folders = [("base", base_dir), *(("adapter", a.folder) for a in adapters)]
    refuse_output_in_inputs(layout.out, folders, files)  # before the output's lock is taken beside it
    four_bit = base_dir if options.qlora.dequantize_base else None
    return PreparedExport(
        options, vendored, registry, profiles, adapters, base_dir, layout, trained_on, four_bit
    )


def check_fit_options(options: ExportOptions, registry: ProfileRegistry) -> None:
    """What --fit needs: the check (its search scores against the reference), a name of its own."""
    if options.fit is None:
        return
    if not options.check:
        raise InputError(
            f"{options.fit.flag} measures each tensor group against the unmerged reference, which "
            "--no-check skips. Drop --no-check, or choose a --profile instead of --fit."
        )
    if options.fit.label.casefold() in (n.casefold() for n in registry.names()):
        raise InputError(
            f"{options.fit.flag} names its profile {options.fit.label}, and a --profile-file already "
            f"defines a profile of that name. To rebuild that file, pass --profile {options.fit.label} without "
            "--fit; to search again, move the earlier profile file out of the way."
        )


def check_fit_reach(options: ExportOptions, base_dir: Path) -> None:
    """A --fit budget that no mix can meet, or that the F16 file already meets, refused before any work
    (on an estimate from the base's headers, with a margin; the search checks the exact sizes)."""
    fit = options.fit
    if fit is None:
        return
    reach, n_params = estimated_reach(base_dir)
    budget = fit.budget_for(n_params)
    if reach.smallest * 0.98 <= budget < reach.largest * 1.02:
        return
    raise InputError(
        f"{fit.flag} ({human_size(budget)}) is out of reach for the base {base_dir}: mixes of "
        f"{', '.join(LADDER)} go from about {human_size(reach.smallest)} to about {human_size(reach.largest)} "
        "(every tensor at F16), before the GGUF's metadata. Pass a budget in that range, or --profile F16 for "
        "the unquantized file."
    )


def check_qlora_options(options: ExportOptions, trained_on: TrainedOn) -> None:
    """What the merge-base choice cannot be combined with (yet), refused before any work."""
    if options.qlora.dequantize_base:
        return  # one merge base, the 4-bit base's own weights: the plain pipeline, nothing to choose
    mode = options.qlora.merge_base or "auto"
    if options.fit is not None:
        raise InputError(
            f"The adapter was trained on a 4-bit base ({trained_on.describe()}); --fit does not yet search "
            "the mixes of a QLoRA export's merge candidates. Pass --profile instead, or --dequantize-base "
            "when the base is the 4-bit model itself."
        )
    if mode == "auto" and not options.check:
        raise InputError(
            f"The adapter was trained on a 4-bit base ({trained_on.describe()}), and --merge-base auto chooses "
            "between merging onto the 16-bit and onto the dequantized 4-bit base by their loss on the evaluation "
            "data, which --no-check skips. Drop --no-check, or pass --merge-base w16 (or dequant)."
        )
    if options.has_imatrix:
        raise InputError(
            f"The adapter was trained on a 4-bit base ({trained_on.describe()}); its merge candidates are not yet "
            "quantized with an importance matrix, so --calibration and --imatrix are refused for a QLoRA adapter. "
            "Leave them out (and choose a profile that needs no importance matrix)."
        )
