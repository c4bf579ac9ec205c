"""The runtime-LoRA path: one quantized base per profile, shared by small GGUF LoRA adapters.

    base ──convert──▶ base F16 GGUF ──quantize──▶ <base>-<PROFILE>.gguf      (once per base, cached)
    adapter ──scale-correct + convert_lora_to_gguf──▶ <adapter>.lora.gguf     (once per adapter)
    base GGUF + adapter GGUF ──llama.cpp runtime LoRA──▶ quality vs the unmerged reference
                                                       └──▶ Modelfile per adapter (FROM + ADAPTER)

With `compare_merged`, every adapter is also exported by merge-then-quantize (pipeline.merge_quantize,
same stage cache and reference), and the report puts both paths side by side per profile.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from converters.lora_to_gguf import KEY_PREFIX, convert_lora_to_gguf
from converters.quantize import quantize_gguf
from converters.vendor import locate_vendored
from exporter import __version__
from exporter.adapter import ADAPTER_CONFIG, LoraAdapter, read_adapter, resolve_base, tokenizer_source
from exporter.artifacts import read_gguf_metadata
from exporter.atomic import write_text_atomic
from exporter.errors import InputError, StageError
from exporter.faults import kill_point
from exporter.hashing import sha256_file
from exporter.merge import BaseModel, LoraUpdate, plan_merge
from exporter.modelfile import chat_spec, model_license, write_modelfile
from exporter.pipeline import (
    MANIFEST,
    ExportOptions,
    _artifact,
    _check_output,
    _OutputGuard,
    adapter_records,
    hash_inputs,
    input_hashes,
    merge_quantize,
    requested_profiles,
    sanitize_name,
    tool_versions,
)
from exporter.quality import (
    QualityOptions,
    apply_gates,
    build_reference,
    cache_root,
    evaluate_gguf,
    parse_gate_overrides,
)
from exporter.safetensors_header import choose_merge_dtype, gguf_source_ftype
from exporter.stage_cache import StageCache, link_into, stage_key
from quant_profiles import QuantProfile

MANIFEST_FORMAT = "edge-export/runtime-lora-manifest/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MERGED_DIR = "merged"
MERGED_PATH_HINT = (
    "Use `edge-export merge-quantize` for this adapter instead: it merges the adapter into the base."
)


@dataclass(frozen=True)
class RuntimeLoraOptions:
    """What `edge-export runtime-lora` was asked to do."""

    adapters: tuple[Path, ...]
    profiles: tuple[str, ...]
    out: Path
    base: str | None = None
    name: str | None = None
    profile_files: tuple[Path, ...] = ()
    threads: int | None = None
    force: bool = False
    allow_pickle: bool = False
    check: bool = True
    compare_merged: bool = False
    quality: QualityOptions = field(default_factory=QualityOptions)
    use_cache: bool = True


@dataclass(frozen=True)
class ScaleCorrection:
    """How one adapter's scaling is made right for llama.cpp: a factor per module folded into lora_B."""

    factors: dict[str, float]
    reasons: tuple[str, ...]  # what the converter alone would get wrong, e.g. "use_rslora"

    @property
    def corrected_modules(self) -> int:
        return sum(1 for f in self.factors.values() if abs(f - 1.0) > 1e-12)


@dataclass
class RuntimeAdapter:
    name: str
    source: LoraAdapter
    gguf: Path
    sha256: str
    size_bytes: int
    correction: ScaleCorrection


@dataclass
class PairQuality:
    """Quality of one base+adapter pair (runtime) and, when built, of the merged GGUF of the same profile."""

    adapter: str
    profile: str
    runtime: dict[str, Any]
    runtime_size: int
    gates: list[Any]
    merged: dict[str, Any] | None = None
    merged_size: int | None = None

    @property
    def passed(self) -> bool:
        return "error" not in self.runtime and all(g.passed for g in self.gates)


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

    @property
    def passed(self) -> bool:
        return all(q.passed for q in self.quality)


# ---------------------------------------------------------------------------------- what can run


def runtime_correction(adapter: LoraAdapter, base_dir: Path) -> ScaleCorrection:
    """Check that the adapter can run as a GGUF LoRA on this base and compute its scale correction.

    Refuses what llama.cpp cannot apply at run time (DoRA, full tensors from modules_to_save or
    trained biases, lm_head or embedding LoRA on a tied-embedding base, …) and an adapter whose
    shapes or recorded base do not fit this base, each with a message that suggests the merged path.
    """
    where = adapter.path / ADAPTER_CONFIG
    config = adapter.config

    def refuse(what: str) -> InputError:
        return InputError(
            f"{where}: {what}, which llama.cpp cannot apply as a runtime adapter. {MERGED_PATH_HINT}"
        )

    if adapter.peft_type != "LORA":
        raise refuse(f"the adapter is a {adapter.peft_type} adapter; runtime adapters must be LoRA")
    if config.get("use_dora"):
        raise refuse("the adapter uses DoRA (use_dora), whose magnitude vector rescales whole weight rows")
    if config.get("modules_to_save"):
        raise refuse(
            f"the adapter trains full copies of {', '.join(map(str, config['modules_to_save']))} (modules_to_save)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise refuse("the adapter trains biases (bias / lora_bias)")
    if config.get("fan_in_fan_out"):
        raise refuse("the adapter targets Conv1D (fan_in_fan_out) layers")
    if config.get("trainable_token_indices"):
        raise refuse("the adapter trains individual token embeddings (trainable_token_indices)")
    if config.get("layer_replication"):
        raise refuse("the adapter replicates layers (layer_replication)")

    base_config = json.loads((base_dir / "config.json").read_text())
    # The merge planner checks names, shapes and the recorded base, exactly as for merge-quantize.
    plan, untied = plan_merge(BaseModel(base_dir), [adapter], base_config)
    if untied:
        raise refuse(
            "the adapter changes lm_head or the token embedding of a base that ties the two (one matrix for both)"
        )
    global_alpha = float(config.get("lora_alpha", 8))
    factors: dict[str, float] = {}
    for target, updates in plan.updates.items():
        for update in updates:
            if not isinstance(update, LoraUpdate) or update.magnitude is not None:
                raise refuse(f"the adapter replaces or rescales {target} outright")
            rank = int(update.lora_b.shape[1])
            # llama.cpp: alpha / rank, with the global alpha and the rank of the tensor.
            factors[target.removesuffix(".weight")] = update.scale / (global_alpha / rank)
    reasons = tuple(key for key in ("use_rslora", "alpha_pattern") if config.get(key))
    return ScaleCorrection(factors, reasons)


# ------------------------------------------------------------------------------------ base identity


def base_uuid(base_files: dict[str, str]) -> str:
    """A UUID for a base model, derived from the sha256 of its input files (written as general.uuid)."""
    digest = hashlib.sha256(json.dumps(base_files, sort_keys=True).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def shapes_sha256(tensors: dict[str, tuple[int, ...]]) -> str:
    text = "\n".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in sorted(tensors.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def base_identity(base_gguf: Path, sha256: str) -> dict[str, str]:
    """What an adapter GGUF records about the base GGUF it was made for."""
    values, tensors = read_gguf_metadata(base_gguf, ("general.architecture", "general.uuid"))
    return {
        "architecture": str(values.get("general.architecture")),
        "uuid": str(values.get("general.uuid")),
        "gguf_sha256": sha256,
        "shapes_sha256": shapes_sha256(tensors),
    }


def check_pair(adapter_gguf: Path, base_gguf: Path) -> None:
    """Refuse to pair a GGUF LoRA with a base GGUF other than (a quantization of) the one it was made for."""
    keys = tuple(f"{KEY_PREFIX}base.{k}" for k in ("architecture", "uuid", "gguf_sha256", "shapes_sha256"))
    recorded, _ = read_gguf_metadata(adapter_gguf, (*keys, "general.type"))
    if recorded.get("general.type") != "adapter":
        raise InputError(
            f"{adapter_gguf} is not a GGUF adapter (general.type is {recorded.get('general.type')!r})."
        )
    if keys[1] not in recorded:
        raise InputError(
            f"{adapter_gguf} does not record the base it was made for; re-create it with `edge-export runtime-lora`."
        )
    values, tensors = read_gguf_metadata(base_gguf, ("general.architecture", "general.uuid"))
    actual = {
        keys[0]: str(values.get("general.architecture")),
        keys[1]: str(values.get("general.uuid")),
        keys[3]: shapes_sha256(tensors),
    }
    for key, value in actual.items():
        if recorded.get(key) != value:
            what = key.rsplit(".", 1)[1]
            raise InputError(
                f"{adapter_gguf} was made for another base than {base_gguf} (base {what}: recorded "
                f"{recorded.get(key)}, this base has {value}). A LoRA applied to another base silently produces "
                "a different model; use the base GGUF it was exported with (recorded sha256 of its F16 "
                f"base: {recorded.get(keys[2])}), or export the adapter again for this base."
            )


# ---------------------------------------------------------------------------------------- the pipeline


def runtime_lora(options: RuntimeLoraOptions, report: Any = lambda _: None) -> RuntimeLoraResult:
    """Quantize the unmerged base once per profile, convert every adapter, write Modelfiles and a
    manifest, then check each base+adapter pair against its unmerged reference."""
    vendored = locate_vendored()
    registry, profiles = requested_profiles(options.profiles, options.profile_files)
    for profile in profiles:
        if profile.needs_imatrix:
            raise InputError(
                f"Profile {profile.name} needs an importance matrix, which runtime-lora does not compute "
                "(the base is shared by every adapter, so no single adapter's data fits it). Choose a profile "
                "that does not need one (e.g. Q4_K_M; see `edge-export profiles`), or use merge-quantize "
                "--calibration FILE."
            )
    if not options.adapters:
        raise InputError("No --adapter given. Name at least one PEFT LoRA adapter folder.")
    adapters = [read_adapter(path, 1.0, options.allow_pickle) for path in options.adapters]
    base_dir = resolve_base(options.base, adapters[0])
    corrections = [runtime_correction(adapter, base_dir) for adapter in adapters]
    names = [sanitize_name(a.path.resolve().name) for a in adapters]
    if len(set(names)) != len(names):
        raise InputError(
            f"Two --adapter folders have the same name ({', '.join(names)}); the adapter files are named after "
            "their folders. Rename or copy one of them."
        )
    base_name = sanitize_name(options.name or base_dir.resolve().name)
    # The base converts as the merge would write it: float16 when it fits float16's range, else BF16
    # (a bfloat16 base holding larger values), never a silent overflow to Inf.
    source_ftype = gguf_source_ftype(choose_merge_dtype(base_dir, None).dtype)
    if source_ftype == "BF16" and any(p.ftype == "F16" for p in profiles):
        raise InputError(
            f"The bfloat16 base {base_dir} holds values beyond float16's range (±65504), so an F16 base would "
            "hold Inf there. Ask for --profile BF16 instead, or a quantized profile."
        )
    out = options.out
    base_paths = {p.name: out / f"{base_name}-{p.name}.gguf" for p in profiles}
    adapter_paths = {n: out / f"{n}.lora.gguf" for n in names}
    modelfile_paths = {(n, p.name): out / f"{n}-{p.name}.Modelfile" for n in names for p in profiles}
    planned = [
        out / MANIFEST,
        out / REPORT_JSON,
        out / REPORT_MD,
        out / MERGED_DIR,
        *base_paths.values(),
        *adapter_paths.values(),
        *modelfile_paths.values(),
    ]
    _check_output(out, planned, options.force)

    guard = _OutputGuard(out)
    seconds: dict[str, float] = {}
    cached: list[str] = []
    versions = tool_versions(vendored)
    base_inputs = hash_inputs([], base_dir)["base"]
    identity_uuid = base_uuid(base_inputs["files"])
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache = StageCache(cache_root() if options.use_cache else None, scratch_parent=out)
        if not options.use_cache:
            guard.claim(cache.root)
        if options.force:
            for stale in (out / MANIFEST, out / REPORT_JSON, out / REPORT_MD):
                stale.unlink(missing_ok=True)

        convert_key = stage_key(
            {
                "stage": "convert-base",
                "base": base_inputs["files"],
                "llama.cpp": vendored.commit,
                "outtype": source_ftype.lower(),
                "name": base_name,
                "uuid": identity_uuid,
            }
        )

        def produce_f16(staging: Path, meta: dict[str, Any]) -> None:
            from converters.hf_to_gguf import convert_hf_to_gguf

            report(f"converting the base {base_dir} to GGUF with llama.cpp {vendored.commit[:9]}")
            start = time.perf_counter()
            digest = convert_hf_to_gguf(
                base_dir,
                staging / "model.gguf",
                vendored,
                base_name,
                outtype=source_ftype.lower(),
                metadata={"general.uuid": identity_uuid},
            )
            meta.update(
                seconds=round(time.perf_counter() - start, 3),
                what=f"{base_name} {source_ftype} GGUF (unmerged base)",
                files={"model.gguf": digest},
            )

        start = time.perf_counter()
        kill_point("convert-base")
        f16_entry, reused = cache.get_or_build("convert", convert_key, produce_f16, label="convert-base")
        kill_point("convert-base:done")
        seconds["convert base"] = round(time.perf_counter() - start, 3)
        if reused:
            cached.append("convert base")
        f16_cached = f16_entry.path / "model.gguf"
        f16_sha = f16_entry.meta["files"]["model.gguf"]

        bases: dict[str, Path] = {}
        base_records = []
        for profile in profiles:
            target = base_paths[profile.name]
            start = time.perf_counter()
            if profile.is_source(source_ftype):
                entry, sha, built_seconds = f16_entry, f16_sha, f16_entry.meta["seconds"]
            else:
                kill_point(f"quantize:{profile.name}")
                entry, reused = cache.get_or_build(
                    "quantize",
                    stage_key(
                        {
                            "stage": "quantize",
                            "convert": convert_key,
                            "llama-cpp-python": versions["llama-cpp-python"],
                            "ftype": profile.ftype,
                            "overrides": profile.overrides.model_dump(mode="json"),
                        }
                    ),
                    _quantizer(f16_cached, profile, options.threads, base_name, report),
                    label=f"quantize:{profile.name}",
                )
                if reused:
                    cached.append(f"quantize base {profile.name}")
                sha, built_seconds = entry.meta["files"]["model.gguf"], entry.meta["seconds"]
            link_into(entry.path / "model.gguf", guard.claim(target))
            if not profile.is_source(source_ftype):
                kill_point(f"quantize:{profile.name}:done")
            seconds[f"base {profile.name}"] = round(time.perf_counter() - start, 3)
            bases[profile.name] = target
            base_records.append(_artifact(target, profile, built_seconds, sha).to_json(out))

        identity = base_identity(f16_cached, f16_sha)
        runtime_adapters = []
        for adapter, name, correction in zip(adapters, names, corrections, strict=True):
            record = adapter_records([adapter])[0]
            lora_key = stage_key(
                {
                    "stage": "lora",
                    "adapter": record["files"],
                    "base": convert_key,
                    "llama.cpp": vendored.commit,
                    "outtype": "f16",
                    "factors": correction.factors,
                }
            )

            def produce_lora(
                staging: Path,
                meta: dict[str, Any],
                adapter: LoraAdapter = adapter,
                correction: ScaleCorrection = correction,
                name: str = name,
            ) -> None:
                report(f"converting the adapter {adapter.path} to a GGUF LoRA")
                metadata = {f"{KEY_PREFIX}base.{k}": v for k, v in identity.items()}
                metadata[f"{KEY_PREFIX}adapter.scale_correction"] = _describe(correction)
                convert_lora_to_gguf(
                    adapter.path,
                    adapter.config,
                    adapter.weights,
                    base_dir,
                    staging / "adapter.gguf",
                    vendored,
                    correction.factors,
                    metadata,
                )
                meta.update(what=f"{name} GGUF LoRA")

            start = time.perf_counter()
            kill_point(f"lora:{name}")
            entry, reused = cache.get_or_build("lora", lora_key, produce_lora, label=f"lora:{name}")
            if reused:
                cached.append(f"adapter {name}")
            target = adapter_paths[name]
            link_into(entry.path / "adapter.gguf", guard.claim(target))
            kill_point(f"lora:{name}:done")
            seconds[f"adapter {name}"] = round(time.perf_counter() - start, 3)
            runtime_adapters.append(
                RuntimeAdapter(
                    name,
                    adapter,
                    target,
                    entry.meta["files"]["adapter.gguf"],
                    target.stat().st_size,
                    correction,
                )
            )
        if cached:
            report(f"reused from the cache: {', '.join(cached)}")

        report("writing Modelfiles and manifest")
        written: dict[tuple[str, str], Path] = {}
        license_text = model_license(base_dir)
        specs = {}
        kill_point("modelfiles")
        for item in runtime_adapters:
            spec = chat_spec(tokenizer_source([item.source], base_dir))
            specs[item.name] = spec
            for profile in profiles:
                target = guard.claim(modelfile_paths[(item.name, profile.name)])
                write_modelfile(
                    target,
                    bases[profile.name],
                    spec,
                    f"{item.name} ({profile.name}, runtime adapter on {base_name}), written by edge-export "
                    f"{__version__}; if your Ollama rejects ADAPTER, use the merged Modelfile from merge-quantize",
                    license_text,
                    adapter=item.gguf,
                )
                written[(item.name, profile.name)] = target
        modelfiles = list(written.values())
        kill_point("manifest")
        manifest = _write_manifest(
            out, base_name, options, versions, base_dir, base_inputs, identity, base_records, runtime_adapters,
            written, specs, seconds, cached,
        )  # fmt: skip
        cache.close()
    except BaseException:
        guard.rollback()
        raise
    notes = sorted({spec.note for spec in specs.values() if spec.note})
    result = RuntimeLoraResult(out, base_name, bases, runtime_adapters, modelfiles, manifest, seconds, cached)
    result.notes = notes
    if options.check:
        kill_point("check")
        start = time.perf_counter()
        _check(result, base_dir, registry, profiles, options, report)
        seconds["check"] = round(time.perf_counter() - start, 3)
        data = json.loads(manifest.read_text())
        data["stage_seconds"] = seconds
        data["quality"] = {"report": REPORT_JSON, "passed": result.passed}
        write_text_atomic(manifest, json.dumps(data, indent=2) + "\n")
    return result


def _quantizer(source: Path, profile: QuantProfile, threads: int | None, base_name: str, report: Any) -> Any:
    def produce(staging: Path, meta: dict[str, Any]) -> None:
        report(f"quantizing the base to {profile.name}")
        start = time.perf_counter()
        quantize_gguf(source, staging / "model.gguf", profile, threads)
        meta.update(seconds=round(time.perf_counter() - start, 3), what=f"{base_name} {profile.name} GGUF")

    return produce


def _describe(correction: ScaleCorrection) -> str:
    if not correction.corrected_modules:
        return "none needed (alpha / r is what llama.cpp applies)"
    factors = sorted({round(f, 6) for f in correction.factors.values()})
    return (
        f"lora_b of {correction.corrected_modules} modules multiplied by {', '.join(map(str, factors))} "
        f"for {', '.join(correction.reasons) or 'per-module scaling'}"
    )


def _check(
    result: RuntimeLoraResult,
    base_dir: Path,
    registry: Any,
    profiles: list[QuantProfile],
    options: RuntimeLoraOptions,
    report: Any,
) -> None:
    """Score every base+adapter pair (and, with compare_merged, the merged GGUFs); write the reports."""
    overrides = parse_gate_overrides(options.quality.gates)
    stage_cache = StageCache(cache_root()) if options.use_cache else None
    for item in result.adapters:
        tokenizer_dir = tokenizer_source([item.source], base_dir)
        inputs = {"inputs": hash_inputs([item.source], base_dir)}
        reference = build_reference(
            base_dir,
            [item.source],
            tokenizer_dir,
            input_hashes(inputs),
            options.quality,
            f"reference:{item.name}",
        )
        report(
            f"reference for {item.name}: {reference.eval.n_scored} tokens"
            + (" (cached)" if reference.cached else f" ({reference.seconds:.0f}s)")
        )
        result.floors[item.name] = reference.base_metrics
        merged = _merged_quality(item, base_dir, profiles, options, report) if options.compare_merged else {}
        for profile in profiles:
            base_gguf = result.bases[profile.name]
            check_pair(item.gguf, base_gguf)
            report(f"evaluating {base_gguf.name} + {item.gguf.name}")
            stage = f"quality:{item.name}:{profile.name}"
            kill_point(stage)
            key = stage_key(
                {
                    "stage": "quality",
                    "artifact": sha256_file(base_gguf),
                    "lora": item.sha256,
                    "reference": reference.key,
                    "device": options.quality.gguf_device,
                }
            )
            entry = stage_cache.lookup("quality", key) if stage_cache else None
            if entry is not None:
                metrics = entry.meta["metrics"]
            else:
                try:
                    metrics = evaluate_gguf(base_gguf, reference, options.quality, lora=item.gguf)
                except StageError as exc:
                    metrics = {"error": str(exc)}
                if stage_cache and "error" not in metrics:
                    with stage_cache.build("quality", key, label=stage) as (_, meta):
                        meta.update(metrics=metrics, what=f"quality of {base_gguf.name} + {item.gguf.name}")
            kill_point(f"{stage}:done")
            gates = (
                apply_gates(registry.get(profile.name), metrics, overrides) if "error" not in metrics else []
            )
            merged_metrics, merged_size = merged.get(profile.name, (None, None))
            result.quality.append(
                PairQuality(
                    item.name,
                    profile.name,
                    metrics,
                    base_gguf.stat().st_size + item.size_bytes,
                    gates,
                    merged_metrics,
                    merged_size,
                )
            )
    result.reports = write_runtime_reports(result)


def _merged_quality(
    item: RuntimeAdapter,
    base_dir: Path,
    profiles: list[QuantProfile],
    options: RuntimeLoraOptions,
    report: Any,
) -> dict[str, tuple[dict[str, Any], int]]:
    """Export the adapter by merge-then-quantize (same cache, same reference) and return its quality."""
    report(f"merge-then-quantize of {item.name} for the comparison")
    exported = merge_quantize(
        ExportOptions(
            adapters=((item.source.path, 1.0),),
            profiles=tuple(p.name for p in profiles),
            out=options.out / MERGED_DIR / item.name,
            base=str(base_dir),
            name=item.name,
            profile_files=options.profile_files,
            threads=options.threads,
            force=True,  # inside our own output folder, which was checked above
            allow_pickle=options.allow_pickle,
            check=True,
            quality=options.quality,
            use_cache=options.use_cache,
        ),
        report,
    )
    assert exported.quality is not None
    return {q.label: (q.metrics, q.size_bytes) for q in exported.quality.items}


# -------------------------------------------------------------------------------------------- outputs


def _write_manifest(
    out: Path,
    base_name: str,
    options: RuntimeLoraOptions,
    versions: dict[str, str],
    base_dir: Path,
    base_inputs: dict[str, Any],
    identity: dict[str, str],
    base_records: list[dict[str, Any]],
    adapters: list[RuntimeAdapter],
    modelfiles: dict[tuple[str, str], Path],
    specs: dict[str, Any],
    seconds: dict[str, float],
    cached: list[str],
) -> Path:
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": base_name,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": versions,
        "options": {
            "profiles": [r["profile"] for r in base_records],
            "threads": options.threads,
            "profile_files": [str(p) for p in options.profile_files],
            "cache": options.use_cache,
            "allow_pickle": options.allow_pickle,
        },
        "inputs": {"base": base_inputs, "adapters": adapter_records([a.source for a in adapters])},
        "base_identity": identity,
        "bases": base_records,
        "adapters": [
            {
                "name": a.name,
                "path": a.gguf.name,
                "source": str(a.source.path.resolve()),
                "size_bytes": a.size_bytes,
                "sha256": a.sha256,
                "scale_correction": _describe(a.correction),
                "corrected_modules": a.correction.corrected_modules,
            }
            for a in adapters
        ],
        "modelfiles": [
            {
                "path": path.name,
                "adapter": name,
                "profile": profile,
                "chat_template_family": specs[name].family,
            }
            for (name, profile), path in modelfiles.items()
        ],
        "stage_seconds": seconds,
        "cached_stages": cached,
    }
    target = out / MANIFEST
    write_text_atomic(target, json.dumps(manifest, indent=2) + "\n")
    return target


COMPARED = ("mean_kld", "top1", "generate_tokens_per_s")


def write_runtime_reports(result: RuntimeLoraResult) -> list[Path]:
    """report.json (every metric of every pair, merged beside runtime) and report.md (the comparison)."""
    rows = [
        {
            "adapter": q.adapter,
            "profile": q.profile,
            "runtime": {"size_bytes": q.runtime_size, "metrics": q.runtime, "gates_passed": q.passed},
            "merged": None if q.merged is None else {"size_bytes": q.merged_size, "metrics": q.merged},
        }
        for q in result.quality
    ]
    data = {
        "format": "edge-export/runtime-lora-report/1",
        "base": result.base_name,
        "pairs": rows,
        "base_floor": result.floors,
    }
    json_path, md_path = result.out / REPORT_JSON, result.out / REPORT_MD
    write_text_atomic(json_path, json.dumps(data, indent=2) + "\n")
    write_text_atomic(md_path, runtime_report_markdown(result))
    return [json_path, md_path]


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def runtime_report_markdown(result: RuntimeLoraResult) -> str:
    lines = [
        f"# {result.base_name}: runtime LoRA adapters",
        "",
        "Each adapter runs as a GGUF LoRA on the quantized base (llama.cpp runtime LoRA, as Ollama's ADAPTER), "
        "checked against the unmerged fine-tune (base + adapter in PyTorch). Where merge-then-quantize was "
        "built too, it is shown beside it. Size is what one deployment needs on disk: base + adapter for the "
        "runtime path (the base is shared by every adapter), the merged GGUF otherwise.",
        "",
        "| adapter | profile | path | size | mean KLD | top-1 | generation tok/s | gates |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    mib = 1024 * 1024
    for q in result.quality:
        r = q.runtime
        status = "evaluation failed" if "error" in r else ("pass" if q.passed else "FAIL")
        lines.append(
            f"| {q.adapter} | {q.profile} | runtime | {q.runtime_size / mib:.1f} MiB | {_f(r.get('mean_kld'), '.5f')} "
            f"| {_f(r.get('top1'), '.1%')} | {_f(r.get('generate_tokens_per_s'), '.0f')} | {status} |"
        )
        if q.merged is not None:
            m = q.merged
            lines.append(
                f"| {q.adapter} | {q.profile} | merged | {(q.merged_size or 0) / mib:.1f} MiB "
                f"| {_f(m.get('mean_kld'), '.5f')} | {_f(m.get('top1'), '.1%')} "
                f"| {_f(m.get('generate_tokens_per_s'), '.0f')} | |"
            )
    lines += ["", "Base model without any adapter (the floor), per adapter's reference:", ""]
    for name, floor in result.floors.items():
        lines.append(
            f"- {name}: mean KLD {_f(floor.get('mean_kld'), '.5f')}, top-1 {_f(floor.get('top1'), '.1%')}"
        )
    return "\n".join(lines) + "\n"
