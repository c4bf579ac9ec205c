"""`edge-export runtime-lora`: one quantized base per profile, shared by small GGUF LoRA adapters.

    convert-base ──▶ quantize:<P> …  ─┬─▶ modelfiles ──▶ reference:<A> ──▶ quality:<A>:<P> … ──▶ report
               └──▶ lora:<A> … ───────┘
    with --compare-merged, per adapter: merge:<A> ──▶ convert:<A> ──▶ quantize:<A>:<P> ──▶ merged:<A>:<P>

The same stages as merge-quantize, in another graph: the merged comparison is built beside the
runtime path (under <out>/merged/<adapter>/), scored against the same reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter.adapter import LoraAdapter, tokenizer_source
from exporter.commands.compare_merged import MergedComparison
from exporter.errors import InputError
from exporter.faults import kill_point
from exporter.graph import Results, StageGraph
from exporter.manifest import MANIFEST, RUNTIME_LORA_FORMAT, Manifest
from exporter.options import QualityOptions, RuntimeLoraOptions
from exporter.preflight import preflight
from exporter.profiles import requested_profiles
from exporter.quality import PairQuality, Reference
from exporter.records import BuiltGGUF, ModelInputs, read_inputs, sanitize_name
from exporter.report import RUNTIME_REPORT_FILES, write_runtime_reports
from exporter.run import Reporter, Run, check_output, silent
from exporter.runtime_adapter import (
    ScaleCorrection,
    base_identity,
    base_uuid,
    check_pair,
    runtime_correction,
)
from exporter.safetensors_header import choose_merge_dtype, gguf_source_ftype
from exporter.serve_config import SERVE_SUFFIX, ServeConfig, ServedAdapter, adapter_refused_note
from exporter.stage_cache import CacheEntry
from exporter.stage_keys import convert_base_key
from exporter.stages.chat import ChatRecord, chat_record, locate_llama_tools_commit, resolve_chat
from exporter.stages.gguf import GGUF_FILE, convert_stage, publish_gguf, quantize_stage
from exporter.stages.lora import RuntimeAdapter, lora_stage
from exporter.stages.merge import MERGED_DIR
from exporter.stages.modelfiles import write_modelfiles, write_serve_configs
from exporter.stages.quality import judged, reference_stage, score_stage
from exporter.tokenizer_files import gguf_name_error
from quant_profiles import ProfileRegistry, QuantProfile


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
class RuntimeLayout:
    out: Path
    base_name: str
    adapter_names: tuple[str, ...]
    profiles: tuple[QuantProfile, ...]

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
        ]


@dataclass(frozen=True)
class PreparedRuntime:
    """What a runtime-LoRA export is, read and checked before its run opens."""

    vendored: VendoredLlamaCpp
    registry: ProfileRegistry
    profiles: list[QuantProfile]
    adapters: list[LoraAdapter]
    base_dir: Path
    layout: RuntimeLayout
    corrections: list[ScaleCorrection]
    source: str  # the base GGUF's type: F16, or BF16 for a bfloat16 base beyond float16's range

    def check_output(self, force: bool) -> None:
        check_output(self.layout.out, self.layout.planned, force, MANIFEST)

    @property
    def finished_files(self) -> list[Path]:
        return self.layout.planned[: 1 + len(RUNTIME_REPORT_FILES)]


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
    names = tuple(sanitize_name(a.path.resolve().name) for a in adapters)
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
    return PreparedRuntime(vendored, registry, profiles, adapters, base_dir, layout, corrections, source)


def runtime_graph(
    run: Run, prepared: PreparedRuntime, options: RuntimeLoraOptions, quality: QualityOptions
) -> RuntimeGraph:
    """The graph of one prepared runtime-LoRA export in an open run."""
    p = prepared
    inputs = ModelInputs.hashed(p.base_dir, tuple(p.adapters), run.cache.hashes)
    return RuntimeGraph(run, inputs, p.layout, p.registry, options, quality, p.corrections, p.source)


def runtime_lora(options: RuntimeLoraOptions, report: Reporter = silent) -> RuntimeLoraResult:
    """Quantize the unmerged base once per profile, convert every adapter, write Modelfiles, check each
    base + adapter pair against its unmerged reference, and write the manifest."""
    p = prepared = prepare_runtime(options)
    force = options.output.force
    before = lambda: prepared.check_output(force)  # noqa: E731
    with Run.open(options.output.out, options.run, report, before=before, vendored=p.vendored) as run:
        merged = options.compare_merged and options.check
        quality = preflight(options, p.base_dir, p.adapters, p.profiles, run.vendored, report, None, merged)
        if force:
            run.replace_finished(prepared.finished_files)
        graph = runtime_graph(run, prepared, options, quality)
        return graph.finish(run.execute(graph.graph))


class RuntimeGraph:
    """The stage graph of runtime-lora, and the manifest made from its results."""

    def __init__(
        self,
        run: Run,
        inputs: ModelInputs,
        layout: RuntimeLayout,
        registry: ProfileRegistry,
        options: RuntimeLoraOptions,
        quality: QualityOptions,
        corrections: list[ScaleCorrection],
        source: str,
    ):
        self.run, self.inputs, self.layout, self.registry = run, inputs, layout, registry
        self.options, self.quality, self.source = options, quality, source
        self.adapters = dict(
            zip(layout.adapter_names, zip(inputs.adapters, corrections, strict=True), strict=True)
        )
        self.identity_uuid = base_uuid(inputs.base_files)
        self.convert_key = convert_base_key(
            inputs.base_files, run.vendored.commit, source.lower(), layout.base_name, self.identity_uuid
        )
        self.graph = g = StageGraph()
        g.add("convert-base", self.convert_base)
        bases = tuple(
            g.add(f"quantize:{p.name}", self.base_quantizer(p), ("convert-base",), shared=True)
            for p in layout.profiles
        )
        loras = tuple(g.add(f"lora:{n}", self.lora(n), ("convert-base",)) for n in layout.adapter_names)
        g.add("modelfiles", self.modelfiles, (*bases, *loras), heavy=False)
        if not options.check:
            return
        scored: list[str] = []
        for n in layout.adapter_names:
            g.add(f"reference:{n}", self.reference(n), ("modelfiles",))
            for p in layout.profiles:
                needs = (f"reference:{n}", f"quantize:{p.name}", f"lora:{n}")
                scored.append(g.add(f"quality:{n}:{p.name}", self.pair_scorer(n, p), needs))
            if options.compare_merged:
                adapter, _correction = self.adapters[n]
                branch = MergedComparison(run, inputs.only(adapter), layout.merged(n), registry, quality)
                scored += branch.add(g, n, layout.profiles, after="modelfiles")
        references = tuple(f"reference:{n}" for n in layout.adapter_names)
        g.add("report", self.report, (*references, *scored), heavy=False)

    # --------------------------------------------------------------------------- the runtime path

    def convert_base(self, _: Results) -> CacheEntry:
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

    def base_quantizer(self, profile: QuantProfile) -> Any:
        def quantize(r: Results) -> BuiltGGUF:
            entry: CacheEntry = r["convert-base"]
            target = self.layout.base(profile.name)
            if profile.is_source(self.source):
                return publish_gguf(self.run, entry, target, profile)
            source = entry.path / GGUF_FILE
            name = f"quantize:{profile.name}"
            return quantize_stage(
                self.run, name, source, self.convert_key, profile, target, runtime_base=True
            )

        return quantize

    def lora(self, name: str) -> Any:
        def convert(r: Results) -> RuntimeAdapter:
            entry: CacheEntry = r["convert-base"]
            identity = base_identity(entry.path / GGUF_FILE, entry.meta["files"][GGUF_FILE])
            adapter, correction = self.adapters[name]
            files = self.inputs.adapter_files[self.inputs.adapters.index(adapter)]
            return lora_stage(
                self.run, name, adapter, files, correction, self.inputs.base_dir, self.convert_key, identity,
                self.layout.adapter(name),
            )  # fmt: skip

        return convert

    def modelfiles(self, r: Results) -> tuple[list[Path], dict[str, ChatRecord], list[Path]]:
        kill_point("modelfiles")
        target = self.options.output.ollama
        written: list[Path] = []
        chats = {
            n: chat_record(resolve_chat(tokenizer_source([a], self.inputs.base_dir), target))
            for n, (a, _) in self.adapters.items()
        }
        serve = self.serve_configs(r, chats)
        if not target.accepts_adapter:
            return written, chats, serve
        self.run.report("writing Modelfiles")
        base_name = self.layout.base_name
        for name in self.adapters:
            spec = chats[name].spec
            targets = {
                self.layout.modelfile(name, p.name): (
                    r[f"quantize:{p.name}"].path,
                    f"{name} ({p.name}, runtime adapter on {base_name}; if your Ollama rejects ADAPTER, use the "
                    "merged Modelfile from merge-quantize)",
                )
                for p in self.layout.profiles
            }
            written += write_modelfiles(
                self.run, targets, spec, self.inputs.base_dir, r[f"lora:{name}"].gguf, chats[name].choice
            )
        return written, chats, serve

    def serve_configs(self, r: Results, chats: dict[str, ChatRecord]) -> list[Path]:
        """One llama-server config per profile: the quantized base with every adapter, none applied."""
        self.run.report("writing llama-server configs")
        adapters = tuple(ServedAdapter(n, r[f"lora:{n}"].gguf) for n in self.layout.adapter_names)
        num_ctx = next(iter(chats.values())).spec.parameters.get("num_ctx")
        configs = {
            self.layout.serve_config(p.name): ServeConfig(
                r[f"quantize:{p.name}"].path, num_ctx, adapters, self.run.vendored.commit
            )
            for p in self.layout.profiles
        }
        return write_serve_configs(self.run, configs)

    def reference(self, name: str) -> Any:
        def build(_: Results) -> Reference:
            kill_point("check")
            adapter, _correction = self.adapters[name]
            tokenizer_dir = tokenizer_source([adapter], self.inputs.base_dir)
            only = self.inputs.only(adapter)
            return reference_stage(self.run, only, tokenizer_dir, self.quality, name=f"reference:{name}")

        return build

    def pair_scorer(self, name: str, profile: QuantProfile) -> Any:
        def score(r: Results) -> PairQuality:
            base: BuiltGGUF = r[f"quantize:{profile.name}"]
            lora: RuntimeAdapter = r[f"lora:{name}"]
            check_pair(lora.gguf, base.path)
            metrics = score_stage(
                self.run,
                f"quality:{name}:{profile.name}",
                r[f"reference:{name}"],
                base.path,
                base.artifact.sha256,
                self.quality,
                lora=(lora.gguf, lora.sha256),
            )
            size = base.artifact.size_bytes + lora.size_bytes
            judged_pair = judged(profile.name, base.path, size, None, metrics, profile, self.quality)
            return PairQuality(name, profile.name, judged_pair)

        return score

    # --------------------------------------------------------------------------- reports and manifest

    def report(self, r: Results) -> tuple[list[PairQuality], dict[str, dict[str, Any]], list[Path]]:
        pairs = [q for key, q in r.items() if key.startswith("quality:")]
        merged = {(n, p): q for key, (n, p, q) in ((k, v) for k, v in r.items() if k.startswith("merged:"))}
        for pair in pairs:
            pair.merged = merged.get((pair.adapter, pair.profile))
        floors = {n: r[f"reference:{n}"].base_metrics for n in self.layout.adapter_names}
        for report_file in RUNTIME_REPORT_FILES:
            self.run.guard.claim(self.layout.out / report_file)
        reports = write_runtime_reports(self.layout.out, self.layout.base_name, pairs, floors)
        return pairs, floors, reports

    def finish(self, r: Results) -> RuntimeLoraResult:
        layout, run = self.layout, self.run
        entry: CacheEntry = r["convert-base"]
        identity = base_identity(entry.path / GGUF_FILE, entry.meta["files"][GGUF_FILE])
        bases = {p.name: r[f"quantize:{p.name}"] for p in layout.profiles}
        adapters = [r[f"lora:{n}"] for n in layout.adapter_names]
        modelfiles, chats, serve = r["modelfiles"]
        cached = run.cached_stages(self.graph.order)
        if cached:
            run.report(f"reused from the cache: {', '.join(cached)}")
        pairs, floors, reports = r.get("report", ([], {}, []))
        sections = {
            "base_identity": identity,
            "bases": [b.artifact.to_json(layout.out) for b in bases.values()],
            "adapters": [a.to_json() for a in adapters],
            "modelfiles": [
                {
                    "path": layout.modelfile(n, p.name).name,
                    "adapter": n,
                    "profile": p.name,
                    "chat_template_family": chats[n].spec.family,
                }
                for n in layout.adapter_names
                for p in layout.profiles
                if modelfiles
            ],  # fmt: skip
            "ollama": {n: c.choice.to_json() for n, c in chats.items()},
            "llama_server": [c.name for c in serve],
        }
        if self.options.check and self.options.compare_merged:
            sections["merged"] = [
                {
                    "adapter": n,
                    "artifacts": [
                        r[f"quantize:{n}:{p.name}"].artifact.to_json(layout.out) for p in layout.profiles
                    ],
                }
                for n in layout.adapter_names
            ]
        passed = all(q.passed for q in pairs)
        manifest = Manifest(
            RUNTIME_LORA_FORMAT,
            layout.base_name,
            run.started_utc,
            run.versions,
            {
                "profiles": [b.artifact.profile for b in bases.values()],
                "threads": self.options.run.threads,
                "profile_files": [str(p) for p in self.options.profiles.files],
                "cache": self.options.run.use_cache,
                "allow_pickle": self.options.inputs.allow_pickle,
            },
            {"base": self.inputs.to_json()["base"], "adapters": self.inputs.adapter_records()},
            sections,
            dict(run.seconds),
            cached,
            quality=None if "report" not in r else {"report": "report.json", "passed": passed},
        )
        path = manifest.write(layout.out)
        notes = sorted({c.spec.note for c in chats.values() if c.spec.note})
        if not modelfiles:
            notes.append(adapter_refused_note(self.options.output.ollama.text))
        return RuntimeLoraResult(
            layout.out, layout.base_name, {n: b.path for n, b in bases.items()}, adapters, modelfiles, path,
            dict(run.seconds), cached, pairs, floors, reports, notes, serve,
        )  # fmt: skip
