"""`edge-export merge-quantize`: the graph of one merged export.

merge ──▶ convert ──▶ quantize:<P> … ──▶ templates ──▶ modelfiles ──▶ reference ──▶ quality:<P> … ──▶ report
  └──▶ chat ─────────────────────────────┘     └──▶ parity        (imatrix between convert and quantize)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converters.stop_tokens import StopCheck
from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter.adapter import LoraAdapter
from exporter.artifacts import GGUFArtifact
from exporter.errors import InputError
from exporter.faults import kill_point
from exporter.graph import Results, StageGraph
from exporter.imatrix import ImatrixStage
from exporter.manifest import EXPORT_FORMAT, MANIFEST, Manifest
from exporter.modelfile import ChatSpec
from exporter.options import ExportOptions, QualityOptions
from exporter.preflight import preflight
from exporter.profiles import requested_profiles
from exporter.qlora import TrainedOn, resolve_trained_on
from exporter.records import BuiltGGUF, MergedModel, ModelInputs, read_inputs, sanitize_name
from exporter.report import REPORT_FILES
from exporter.run import Reporter, Run, check_output, silent
from exporter.serve_config import SERVE_SUFFIX, ServeConfig
from exporter.stages.chat import (
    ChatRecord,
    chat_stage,
    locate_llama_tools_commit,
    parity_stage,
    parity_to_json,
    report_template_choice,
)
from exporter.stages.gguf import convert_merged, quantize_from
from exporter.stages.imatrix import computed_imatrix_stage, given_imatrix_stage
from exporter.stages.merge import MERGED_DIR, merge_stage
from exporter.stages.modelfiles import write_modelfiles, write_serve_configs
from exporter.stages.qlora import QloraChoice, four_bit_choice, qlora_choice, unpacked_base
from exporter.stages.quality import QualitySummary, judged, reference_stage, score_stage, write_quality_report
from exporter.stages.stops import stops_stage, stops_to_json
from exporter.tokenizer_files import gguf_name_error, tokenizer_size
from exporter.tokenizer_parity import ParityReport, check_embedded_chat_template
from quant_profiles import ProfileRegistry, QuantProfile

SOURCE_FTYPES = ("F16", "BF16")


@dataclass(frozen=True)
class ExportLayout:
    """Where each output of one export goes: <out>/<name>-<PROFILE>.gguf, .Modelfile, merged/, …"""

    out: Path
    name: str
    profiles: tuple[QuantProfile, ...]
    has_imatrix: bool

    def gguf(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}.gguf"

    def modelfile(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}.Modelfile"

    def serve_config(self, label: str) -> Path:
        return self.out / f"{self.name}-{label}{SERVE_SUFFIX}"

    @property
    def planned(self) -> list[Path]:
        return [
            self.out / MANIFEST,
            self.out / MERGED_DIR,
            *(self.gguf(ftype) for ftype in SOURCE_FTYPES),
            *(self.gguf(p.name) for p in self.profiles),
            *(self.modelfile(p.name) for p in self.profiles),
            *(self.serve_config(p.name) for p in self.profiles),
            *(self.out / name for name in REPORT_FILES),
            *([self.out / f"{self.name}.imatrix.gguf"] if self.has_imatrix else []),
        ]


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


@dataclass(frozen=True)
class PreparedExport:
    """What an export is, read and checked before its run opens: profiles, inputs, output layout."""

    vendored: VendoredLlamaCpp
    registry: ProfileRegistry
    profiles: list[QuantProfile]
    adapters: list[LoraAdapter]
    base_dir: Path
    layout: ExportLayout
    trained_on: Any = None  # exporter.qlora.TrainedOn: the adapter is a QLoRA adapter
    four_bit_base: Path | None = None  # --dequantize-base: the 4-bit base given; base_dir: its unpacking

    def check_output(self, force: bool) -> None:
        check_output(self.layout.out, self.layout.planned, force, MANIFEST)

    @property
    def finished_files(self) -> list[Path]:
        """What a finished export's run replaces with --force: the manifest and the reports."""
        return [self.layout.out / MANIFEST, *(self.layout.out / name for name in REPORT_FILES)]


def prepare_export(options: ExportOptions) -> PreparedExport:
    """The checks of an export that need no run: the installation, the profiles, the inputs."""
    vendored = locate_vendored()  # a broken installation is reported before anything about the inputs
    locate_llama_tools_commit()  # llama.cpp's chat-template renderer checks every export's template
    registry, profiles = requested_profiles(options.profiles)
    for profile in profiles:
        if profile.needs_imatrix and not options.has_imatrix:
            raise InputError(
                f"Profile {profile.name} needs an importance matrix, and none can be computed without "
                "calibration data. Pass --calibration FILE (plain text, or JSONL chats from the adapter's "
                "domain) or --imatrix FILE (a matrix computed earlier), or choose a profile that does not "
                "need one (e.g. Q4_K_M; see `edge-export profiles`)."
            )
    adapters, base_dir = read_inputs(options.inputs)
    trained_on = resolve_trained_on(options.qlora, base_dir, [a.path for a in adapters])
    if trained_on is not None:
        check_qlora_options(options, trained_on)
    name = sanitize_name(options.output.name or adapters[0].path.resolve().name)
    unloadable = gguf_name_error(name, [a.path for a in adapters] + [base_dir])
    if unloadable:
        raise InputError(unloadable)
    layout = ExportLayout(options.output.out, name, tuple(profiles), options.has_imatrix)
    four_bit = base_dir if options.qlora.dequantize_base else None
    return PreparedExport(vendored, registry, profiles, adapters, base_dir, layout, trained_on, four_bit)


def export_graph(
    run: Run, prepared: PreparedExport, options: ExportOptions, quality: QualityOptions
) -> ExportGraph:
    """The graph of one prepared export in an open run, checked with `quality` (what preflight returned)."""
    inputs = ModelInputs.hashed(prepared.base_dir, tuple(prepared.adapters), run.cache.hashes)
    choice = None
    if prepared.four_bit_base is not None:  # the base is the training base itself: one merge base
        choice = four_bit_choice(prepared.four_bit_base, inputs, prepared.trained_on)
    elif prepared.trained_on is not None:  # both merge candidates are built and judged before the graph
        layout = prepared.layout
        plan: dict[str, Any] = {"name": layout.name, "dtype": options.dtype, "profiles": layout.profiles}
        plan.update(registry=prepared.registry, quality=quality)
        mode = options.qlora.merge_base or "auto"
        choice = qlora_choice(run, inputs, prepared.trained_on, mode, options.check, plan)
    return ExportGraph(run, inputs, prepared.layout, prepared.registry, options, quality, choice)


def merge_quantize(options: ExportOptions, report: Reporter = silent) -> ExportResult:
    """Merge → convert → quantize → Modelfiles → quality → manifest; on failure nothing this run wrote
    stays. The output folder is locked for the whole run: a second run on it waits or fails clearly."""
    prepared = prepare_export(options)
    out = options.output.out
    force = options.output.force

    with Run.open(
        out, options.run, report, before=lambda: prepared.check_output(force), vendored=prepared.vendored
    ) as run:
        if prepared.four_bit_base is not None:  # from here on the base is its dequantized weights
            unpacked = unpacked_base(run, ModelInputs.hashed(prepared.base_dir, (), run.cache.hashes))
            prepared = replace(prepared, base_dir=unpacked)
        quality = preflight(
            options,
            prepared.base_dir,
            prepared.adapters,
            prepared.profiles,
            run.vendored,
            report,
            options.dtype,
        )
        if force:
            run.replace_finished(prepared.finished_files)
        export = export_graph(run, prepared, options, quality)
        return export.finish(run.execute(export.graph))


class ExportGraph:
    """The stage graph of one merged export, and the manifest made from its results."""

    def __init__(
        self,
        run: Run,
        inputs: ModelInputs,
        layout: ExportLayout,
        registry: ProfileRegistry,
        options: ExportOptions,
        quality: QualityOptions,
        qlora: QloraChoice | None = None,
    ):
        """`qlora`: a QLoRA adapter's chosen merge base (the merge reads its inputs; the references and
        the manifest keep `inputs`)."""
        self.run, self.inputs, self.layout, self.registry = run, inputs, layout, registry
        self.options, self.quality, self.qlora = options, quality, qlora
        self.graph = StageGraph()
        g = self.graph
        g.add("merge", self.merge)
        g.add("chat", self.chat, ("merge",), heavy=False)
        g.add("convert", self.convert, ("merge",))
        source: tuple[str, ...] = ("convert",)
        if options.has_imatrix:
            g.add("imatrix", self.imatrix, ("merge", "convert"))
            source = ("convert", "imatrix")
        quantized = tuple(
            g.add(f"quantize:{p.name}", self.quantizer(p), source, shared=True) for p in layout.profiles
        )
        g.add("parity", self.parity, ("merge", "convert"), heavy=False)
        g.add("templates", self.templates, ("merge", "chat", "convert", *quantized), heavy=False)
        g.add("modelfiles", self.modelfiles, ("chat", "templates", *quantized), heavy=False)
        g.add("stops", self.stops, ("chat", *quantized))
        if options.check:
            g.add("reference", self.reference, ("merge", "modelfiles"))
            scored = [g.add("quality:source", self.scorer(None), ("reference", "convert"))]
            scored += list(
                g.add(f"quality:{p.name}", self.scorer(p), ("reference", "convert", f"quantize:{p.name}"))
                for p in layout.profiles
            )
            g.add("report", self.report, ("reference", *scored), heavy=False)

    # --------------------------------------------------------------------------- the stages

    def merge(self, _: Results) -> MergedModel:
        inputs = self.qlora.kept_inputs if self.qlora else self.inputs
        merged = merge_stage(
            self.run, inputs, self.options.dtype, self.layout.name, self.layout.out / MERGED_DIR
        )
        check_float16_range(merged, self.layout.profiles, self.inputs.base_dir)
        return merged

    def chat(self, r: Results) -> Any:
        merged: MergedModel = r["merge"]
        chat = chat_stage(self.run, merged.key, merged.path, self.options.output.ollama)
        report_template_choice(self.run, chat)
        return chat

    def convert(self, r: Results) -> BuiltGGUF:
        merged: MergedModel = r["merge"]
        ftype = merged.result.gguf_ftype
        target = self.layout.gguf(ftype)
        if self.options.output.force:  # an earlier export of this name may have converted to the other type
            for other in SOURCE_FTYPES:
                if other != ftype and other not in (p.name for p in self.layout.profiles):
                    self.layout.gguf(other).unlink(missing_ok=True)
        return convert_merged(self.run, "convert", merged, self.layout.name, target, self.registry.get(ftype))

    def imatrix(self, r: Results) -> ImatrixStage:
        merged: MergedModel = r["merge"]
        f16: BuiltGGUF = r["convert"]
        name = self.layout.name
        if self.options.imatrix is not None:
            return given_imatrix_stage(self.run, self.options.imatrix, f16.path, f16.key, name)
        assert self.options.calibration is not None
        return computed_imatrix_stage(
            self.run,
            self.options.calibration,
            self.options.calibration_tokens,
            merged.path,
            f16.path,
            f16.key,
            name,
        )

    def quantizer(self, profile: QuantProfile) -> Any:
        def quantize(r: Results) -> BuiltGGUF:
            target = self.layout.gguf(profile.name)
            return quantize_from(
                self.run, f"quantize:{profile.name}", r["convert"], profile, target, r.get("imatrix")
            )

        return quantize

    def parity(self, r: Results) -> ParityReport:
        merged: MergedModel = r["merge"]
        f16: BuiltGGUF = r["convert"]
        new_from = tokenizer_size(self.inputs.base_dir)  # the tokens an adapter added come after the base's
        return parity_stage(self.run, f16.key, merged.path, f16.path, new_from=new_from)

    def templates(self, r: Results) -> None:
        merged: MergedModel = r["merge"]
        ggufs = [r["convert"], *(r[f"quantize:{p.name}"] for p in self.layout.profiles)]
        self.run.report("checking each GGUF's chat template against the merged model's")
        headers = {g.path: g.header for g in ggufs}
        check_embedded_chat_template(r["chat"].template, merged.path, list(headers), headers)

    def modelfiles(self, r: Results) -> tuple[list[Path], list[Path]]:
        spec: ChatSpec = r["chat"].spec
        merged_dir = self.layout.out / MERGED_DIR
        targets = {
            self.layout.modelfile(p.name): (r[f"quantize:{p.name}"].path, f"{self.layout.name} ({p.name})")
            for p in self.layout.profiles
        }
        self.run.report("writing Modelfiles")
        kill_point("modelfiles")
        written = write_modelfiles(self.run, targets, spec, merged_dir, choice=r["chat"].choice)
        num_ctx = spec.parameters.get("num_ctx")
        configs = {
            self.layout.serve_config(p.name): ServeConfig(
                gguf, num_ctx, llama_cpp_commit=self.run.vendored.commit
            )
            for p, (gguf, _) in zip(self.layout.profiles, targets.values(), strict=True)
        }
        return written, write_serve_configs(self.run, configs)

    def stops(self, r: Results) -> dict[str, StopCheck]:
        chat: ChatRecord = r["chat"]
        if chat.stop_prompt is None:
            return {}
        ggufs = {p.name: r[f"quantize:{p.name}"].artifact for p in self.layout.profiles}
        checks = stops_stage(
            self.run, {n: (a.path, a.sha256) for n, a in ggufs.items()}, chat.terminator, chat.stop_prompt
        )
        for label, check in checks.items():
            self.run.report(check.summary(ggufs[label].path.name))
        return checks

    def reference(self, r: Results) -> Any:
        kill_point("check")
        merged: MergedModel = r["merge"]
        self.run.report("checking quality against the unmerged reference")
        # A dequant merge base is the model as trained, so it is judged against that model's reference.
        kept = self.qlora.decision if self.qlora else None
        # --dequantize-base: the unpacked 4-bit base's weights are those the adapter was trained on.
        if self.qlora is not None and self.qlora.four_bit_base is not None:
            return reference_stage(self.run, self.inputs, merged.path, self.quality, "reference:as-trained")
        if kept is not None and kept.chosen == "dequant":
            return reference_stage(
                self.run, self.inputs, merged.path, self.quality, "reference:as-trained", kept.trained_on
            )
        return reference_stage(self.run, self.inputs, merged.path, self.quality)

    def scorer(self, profile: QuantProfile | None) -> Any:
        def score(r: Results) -> Any:
            f16: BuiltGGUF = r["convert"]
            if profile is not None and profile.is_source(f16.artifact.profile):
                return None  # scored once, as the unquantized GGUF
            built: BuiltGGUF = f16 if profile is None else r[f"quantize:{profile.name}"]
            a = built.artifact
            name = f"quality:{'source' if profile is None else profile.name}"
            metrics = score_stage(self.run, name, r["reference"], a.path, a.sha256, self.quality)
            label_profile = self.registry.get(a.profile)
            return judged(
                a.profile, a.path, a.size_bytes, a.bits_per_weight, metrics, label_profile, self.quality
            )

        return score

    def report(self, r: Results) -> QualitySummary:
        items = [q for name, q in r.items() if name.startswith("quality:") and q is not None]
        items.sort(key=lambda item: -item.size_bytes)  # largest (closest to the fine-tune) first
        extra = {"merge_base": self.qlora.section(self.run.seconds)} if self.qlora else None
        return write_quality_report(
            self.run, self.layout.name, self.inputs, r["reference"], self.quality, items, extra
        )

    # --------------------------------------------------------------------------- the manifest

    def finish(self, r: Results) -> ExportResult:
        merged: MergedModel = r["merge"]
        f16: BuiltGGUF = r["convert"]
        artifacts = [r[f"quantize:{p.name}"].artifact for p in self.layout.profiles]
        chat = r["chat"]
        parity: ParityReport = r["parity"]
        imatrix: ImatrixStage | None = r.get("imatrix")
        summary: QualitySummary | None = r.get("report")
        out = self.layout.out
        modelfiles, serve_configs = r["modelfiles"]
        sections: dict[str, Any] = {
            "merge": merged.to_json(MERGED_DIR),
            "precision": merged.precision(),
            "intermediates": [f16.artifact.to_json(out)],
            "artifacts": [a.to_json(out) for a in artifacts],
            "modelfiles": [
                {
                    "path": m.name,
                    "chat_template_family": chat.spec.family,
                    "stops": list(chat.spec.stops),
                    "verified_conversations": chat.spec.verified_conversations,
                }
                for m in modelfiles
            ],
            "tokenizer_parity": parity.to_json(),
            "ollama": chat.choice.to_json(),
            "llama_server": [c.name for c in serve_configs],
            "stops": stops_to_json(r["stops"]),
            "llama_cpp_chat_template": None if chat.jinja is None else parity_to_json(chat.jinja),
        }
        if imatrix is not None:
            sections["imatrix"] = imatrix.to_json(out)
        if self.qlora is not None:
            sections["merge_base"] = self.qlora.section(self.run.seconds)
        notes = [n for n in (chat.spec.note, None if parity.passed else parity.summary()) if n]
        notes += [c.summary(label) for label, c in r["stops"].items() if not c.passed]
        notes += [chat.choice.llama_server_note] if chat.choice.llama_server_note else []
        self.run.report(parity.summary())
        cached = self.run.cached_stages(self.graph.order)
        if cached:
            self.run.report(f"reused from the cache: {', '.join(cached)}")
        manifest = Manifest(
            EXPORT_FORMAT,
            self.layout.name,
            self.run.started_utc,
            self.run.versions,
            self.manifest_options(merged, artifacts),
            self.inputs_record(),
            sections,
            dict(self.run.seconds),
            cached,
            [chat.spec.note] if chat.spec.note else [],
            None if summary is None else {"report": "report.json", "passed": summary.passed},
        )
        path = manifest.write(out)
        return ExportResult(
            out,
            self.layout.name,
            artifacts,
            modelfiles,
            path,
            dict(self.run.seconds),
            notes,
            summary,
            imatrix,
            None if self.qlora is None else sections["merge_base"],
            serve_configs,
        )

    def inputs_record(self) -> dict[str, Any]:
        """The manifest's "inputs": a 4-bit base (--dequantize-base) as given, with the folder it became."""
        record = self.inputs.to_json()
        four_bit = self.qlora.four_bit_base if self.qlora else None
        if four_bit is not None:
            given = ModelInputs.hashed(four_bit, (), self.run.cache.hashes)
            record["base"] = {**given.to_json()["base"], "dequantized": record["base"]}
        return record

    def manifest_options(self, merged: MergedModel, artifacts: list[GGUFArtifact]) -> dict[str, Any]:
        options = self.options
        return {
            "profiles": [a.profile for a in artifacts],
            "dtype": merged.result.dtype,
            "threads": options.run.threads,
            "profile_files": [str(p) for p in options.profiles.files],
            "cache": options.run.use_cache,
            "allow_pickle": options.inputs.allow_pickle,
            "trust_remote_code": options.inputs.trust_remote_code,
            "reference_dtype": self.quality.reference_dtype,
            "merge_base": None if self.qlora is None else self.qlora.decision.mode,
        }


def check_qlora_options(options: ExportOptions, trained_on: TrainedOn) -> None:
    """What the merge-base choice cannot be combined with (yet), refused before any work."""
    if options.qlora.dequantize_base:
        return  # one merge base, the 4-bit base's own weights: the plain pipeline, nothing to choose
    mode = options.qlora.merge_base or "auto"
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


def check_float16_range(merged: MergedModel, profiles: tuple[QuantProfile, ...], base_dir: Path) -> None:
    """A float16 GGUF made from a bfloat16 or float32 merge must not overflow to Inf."""
    result = merged.result
    if result.gguf_ftype == "F16" and not result.fits_float16:  # a --dtype float32 merge
        raise InputError(
            f"The merged model holds values up to {result.max_abs:.6g}, beyond float16's range (±65504), and "
            f"the converter writes {result.dtype} merges as F16, which would hold Inf there. Pass --dtype "
            "bfloat16 (or leave --dtype out: a bfloat16 base that does not fit float16 stays bfloat16)."
        )
    wanted = [
        p.name
        for p in profiles
        if not p.is_source(result.gguf_ftype)
        and (p.ftype == "F16" or "F16" in p.overrides.tensor_types.values())
    ]
    if wanted and not result.fits_float16:
        raise InputError(
            f"The merged model holds values up to {result.max_abs:.6g}, beyond float16's range (±65504), so "
            f"{', '.join(wanted)} would hold Inf where the model has large weights (the base {base_dir} is "
            f"{result.dtype}). Ask for BF16 instead, or a quantized profile (Q8_0, Q4_K_M, …), which keep the range."
        )
