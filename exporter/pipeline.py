"""The one place that orders the stages of an export and records their provenance.

adapter + base ──merge──▶ merged HF dir ──convert──▶ F16 GGUF ──quantize──▶ <name>-<PROFILE>.gguf
                                                                  └──▶ Modelfiles + manifest.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from converters.hf_to_gguf import convert_hf_to_gguf
from converters.quantize import quantize_gguf
from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter import __version__
from exporter.adapter import LoraAdapter, read_adapter, resolve_base
from exporter.artifacts import GGUFArtifact, GGUFHeader, MergeResult, read_gguf_header
from exporter.atomic import atomic_target, write_text_atomic
from exporter.errors import InputError, StageError
from exporter.faults import kill_point
from exporter.hashing import HashMemo, hash_files, sha256_file
from exporter.imatrix import DEFAULT_MAX_TOKENS as IMATRIX_MAX_TOKENS
from exporter.imatrix import ImatrixStage, activation_dtype, compute_imatrix, read_imatrix_file
from exporter.locks import LockPolicy, hold_lock, output_lock_path
from exporter.memory import fit_check, fit_merge
from exporter.modelfile import ChatSpec, chat_spec, model_license, write_modelfile
from exporter.preflight import check_writable, preflight_export
from exporter.quality import (
    ArtifactQuality,
    GateResult,
    QualityOptions,
    apply_gates,
    build_reference,
    cache_root,
    evaluate_gguf,
    gate_diagnosis,
    parse_gate_overrides,
)
from exporter.report import REPORT_FILES, REPORT_JSON, report_data, write_reports
from exporter.safetensors_header import DEFAULT_SHARD_BYTES
from exporter.stage_cache import CacheEntry, StageCache, link_into, stage_key
from exporter.tokenizer_parity import ParityReport, check_embedded_chat_template, check_tokenizer_parity
from quant_profiles import ProfileError, ProfileRegistry, QuantProfile, builtin_profiles

MANIFEST = "manifest.json"
# Bumped when the merge writes different bytes from the same inputs (2: ΔW added by one fused addmm;
# 3: config and tokenizer files written in the dialect both transformers majors read).
MERGE_ARITHMETIC = 3
MERGED_DIR = "merged"
INPUT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja")
Reporter = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """Everything merge-quantize was asked to do, resolved and validated before any work."""

    adapters: tuple[tuple[Path, float], ...]
    profiles: tuple[str, ...]
    out: Path
    base: str | None = None
    name: str | None = None
    profile_files: tuple[Path, ...] = ()
    dtype: str | None = None
    threads: int | None = None
    force: bool = False
    allow_pickle: bool = False
    check: bool = True
    quality: QualityOptions = field(default_factory=QualityOptions)
    use_cache: bool = True
    jobs: int = 1
    calibration: Path | None = None
    calibration_tokens: int = IMATRIX_MAX_TOKENS
    imatrix: Path | None = None  # an importance-matrix GGUF to use instead of computing one
    trust_remote_code: bool = False
    lock: LockPolicy = field(default_factory=LockPolicy)
    max_memory: int | None = None  # bytes; None = no budget
    reference_dtype_fixed: bool = True  # False: --max-memory may switch the reference to bfloat16
    rehash: bool = False  # verify cached stages and hash inputs by reading every byte

    @property
    def has_imatrix(self) -> bool:
        """An importance matrix is computed (--calibration) or given (--imatrix)."""
        return self.calibration is not None or self.imatrix is not None


@dataclass
class QualitySummary:
    items: list[ArtifactQuality]
    floor: ArtifactQuality
    reports: list[Path]
    reference_seconds: float
    reference_cached: bool

    @property
    def passed(self) -> bool:
        return all(item.passed for item in self.items)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for item in self.items for g in item.gates if not g.passed]


@dataclass
class ExportResult:
    out: Path
    name: str
    artifacts: list[GGUFArtifact]
    modelfiles: list[Path]
    manifest: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    quality: QualitySummary | None = None
    imatrix: ImatrixStage | None = None


def sanitize_name(raw: str) -> str:
    """A model name that is safe in a file name: no path separators, no odd characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip(".-_")
    return cleaned[:80] or "model"


def tool_versions(vendored: VendoredLlamaCpp) -> dict[str, str]:
    versions = {"edge-export": __version__, "llama.cpp": vendored.commit}
    for package in ("llama-cpp-python", "torch", "transformers", "peft", "safetensors", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _input_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES]


class _OutputGuard:
    """Tracks what this run writes into the output folder and removes it all if the run fails."""

    def __init__(self, out: Path):
        self.out = out
        self.created_out = not out.exists()
        self.paths: list[Path] = []

    def claim(self, path: Path) -> Path:
        self.paths.append(path)
        return path

    def rollback(self) -> None:
        for path in reversed(self.paths):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.created_out and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def _entry_header(entry: CacheEntry) -> GGUFHeader:
    """The header facts of a cached GGUF: recorded when the entry was built (reading them again means
    walking the whole vocabulary), or read from the file for entries recorded without them."""
    known = entry.meta.get("header")
    return GGUFHeader(**known) if isinstance(known, dict) else read_gguf_header(entry.path / "model.gguf")


def _check_output(out: Path, planned: list[Path], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} exists and is not a folder. Choose another --out.")
    existing = [p for p in planned if p.exists()]
    # Without a manifest the files are what an interrupted run left: the new run replaces them.
    finished = (out / MANIFEST).exists() or out.name == MANIFEST
    if existing and finished and not force:
        raise InputError(
            f"{existing[0]} already exists (and {len(existing) - 1} more of this run's outputs). Refusing to "
            "overwrite a finished export; pass --force to replace it, or choose another --out."
        )
    check_writable(out)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 3)


def _artifact(
    path: Path, profile: QuantProfile, seconds: float, sha256: str, header: GGUFHeader | None = None
) -> GGUFArtifact:
    """The record of a GGUF whose sha256 is known (verified by the stage cache)."""
    header = header or read_gguf_header(path)
    if header.file_type != profile.ftype_id:
        raise StageError(
            f"{path} carries file type {header.file_type_name} in its GGUF header, but profile {profile.name} "
            f"asked for {profile.ftype}; the quantizer did not do what was asked."
        )
    size = path.stat().st_size
    return GGUFArtifact(
        path=path,
        profile=profile.name,
        file_type=header.file_type_name,
        size_bytes=size,
        bits_per_weight=round(size * 8 / max(header.n_params, 1), 3),
        sha256=sha256,
        seconds=round(seconds, 3),
    )


def resolve_profiles(
    names: tuple[str, ...], files: tuple[Path, ...]
) -> tuple[ProfileRegistry, list[QuantProfile]]:
    """The registry (built-in plus the user's files) and the requested profiles, without duplicates."""
    try:
        registry = builtin_profiles().with_files(files)
        profiles = [registry.get(name) for name in names]
    except ProfileError as exc:
        raise InputError(
            f"{exc}. See `edge-export profiles`; a profile file follows the schema of quant_profiles/."
        ) from exc
    return registry, list({p.name: p for p in profiles}.values())


def requested_profiles(
    names: tuple[str, ...], files: tuple[Path, ...]
) -> tuple[ProfileRegistry, list[QuantProfile]]:
    """resolve_profiles for a command that quantizes: at least one profile must be named."""
    registry, profiles = resolve_profiles(names, files)
    if not profiles:
        raise InputError(
            "No --profile given. Name at least one, e.g. --profile Q4_K_M (see `edge-export profiles`)."
        )
    return registry, profiles


@dataclass(frozen=True)
class MergeOptions:
    """What `edge-export merge` was asked to do."""

    adapters: tuple[tuple[Path, float], ...]
    out: Path
    base: str | None = None
    dtype: str | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    force: bool = False
    allow_pickle: bool = False
    max_memory: int | None = None  # bytes; None = no budget


def adapter_records(adapters: list[LoraAdapter], memo: HashMemo | None = None) -> list[dict[str, Any]]:
    """Each adapter's folder, weight, PEFT type and file hashes, as manifests and provenance record them."""
    return [
        {
            "path": str(a.path.resolve()),
            "weight": a.weight,
            "peft_type": a.peft_type,
            "files": hash_files(_input_files(a.path), a.path, memo),
        }
        for a in adapters
    ]


def merge_provenance(records: list[dict[str, Any]], base_dir: Path) -> dict[str, Any]:
    """What a merged folder came from: tool version, the base, and the adapters (hashes of theirs only:
    bases can be huge)."""
    return {
        "tool": f"edge-export {__version__}",
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": str(base_dir.resolve()),
        "adapters": records,
    }


def merge_model(options: MergeOptions, report: Reporter = lambda _: None) -> MergeResult:
    """`edge-export merge`: the merged HF folder alone, written atomically at options.out."""
    adapters = [read_adapter(path, weight, options.allow_pickle) for path, weight in options.adapters]
    base_dir = resolve_base(options.base, adapters[0])
    out = options.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.force:
        raise InputError(
            f"The output folder {out} already exists and is not empty. Refusing to overwrite it; pass --force to "
            "replace it, or choose another --out."
        )
    _check_output(out, [], options.force)
    from exporter.merge import DTYPES, merge_adapters  # torch: imported when there is merging to do

    if options.max_memory:
        requested = DTYPES.get((options.dtype or "").lower())
        estimate = fit_merge(base_dir, adapters, options.max_memory, requested.itemsize if requested else 2)
        report(f"memory: the merge needs about {estimate.peak_bytes >> 20} MiB ({estimate.detail})")
    report(f"merging {len(adapters)} adapter(s) into {base_dir}")
    return merge_adapters(
        base_dir,
        adapters,
        out,
        dtype=options.dtype,
        max_shard_bytes=options.max_shard_bytes,
        provenance=merge_provenance(adapter_records(adapters), base_dir),
    )


def merge_quantize(options: ExportOptions, report: Reporter = lambda _: None) -> ExportResult:
    """Run merge → convert → quantize → Modelfiles → manifest; on failure remove what this run wrote.

    The output folder is locked for the whole run: a second run on it waits or fails clearly."""
    policy = replace(options.lock, report=options.lock.report or report)
    with hold_lock(output_lock_path(options.out), f"the output folder {options.out}", policy):
        return _merge_quantize(replace(options, lock=policy), report)


def _merge_quantize(options: ExportOptions, report: Reporter) -> ExportResult:
    vendored = locate_vendored()
    registry, profiles = requested_profiles(options.profiles, options.profile_files)
    for profile in profiles:
        if profile.needs_imatrix and not options.has_imatrix:
            raise InputError(
                f"Profile {profile.name} needs an importance matrix, and none can be computed without "
                "calibration data. Pass --calibration FILE (plain text, or JSONL chats from the adapter's "
                "domain) or --imatrix FILE (a matrix computed earlier), or choose a profile that does not "
                "need one (e.g. Q4_K_M; see `edge-export profiles`)."
            )
    if options.calibration is not None and options.imatrix is not None:
        raise InputError(
            f"Both --calibration {options.calibration} and --imatrix {options.imatrix} were given. Pass "
            "--calibration to compute the importance matrix, or --imatrix to use one computed earlier, not both."
        )
    if options.calibration is not None and not options.calibration.is_file():
        raise InputError(
            f"The calibration data {options.calibration} does not exist. Pass a .txt or .jsonl file to "
            "--calibration."
        )
    if options.imatrix is not None and not options.imatrix.is_file():
        raise InputError(
            f"The importance matrix {options.imatrix} does not exist. Pass an imatrix GGUF to --imatrix "
            "(the <name>.imatrix.gguf of an earlier run, or llama-imatrix's output)."
        )
    adapters = [read_adapter(path, weight, options.allow_pickle) for path, weight in options.adapters]
    base_dir = resolve_base(options.base, adapters[0])
    name = sanitize_name(options.name or adapters[0].path.resolve().name)
    out = options.out
    # The converter writes F16, or BF16 where the merge kept bfloat16 (decided by the merge's range check).
    source_paths = [out / f"{name}-{ftype}.gguf" for ftype in ("F16", "BF16")]
    planned_ggufs = {p.name: out / f"{name}-{p.name}.gguf" for p in profiles}
    planned_modelfiles = {p.name: out / f"{name}-{p.name}.Modelfile" for p in profiles}
    reports = [out / name for name in REPORT_FILES]
    _check_output(
        out,
        [
            out / MANIFEST,
            out / MERGED_DIR,
            *source_paths,
            *planned_ggufs.values(),
            *planned_modelfiles.values(),
            *reports,
            *([out / f"{name}.imatrix.gguf"] if options.has_imatrix else []),
        ],
        options.force,
    )
    options = replace(
        options,
        quality=preflight_export(options, base_dir, adapters, profiles, vendored, cache_root(), report),
    )

    guard = _OutputGuard(out)
    seconds: dict[str, float] = {}
    cached: list[str] = []
    versions = tool_versions(vendored)
    side_work = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-side")
    try:
        out.mkdir(parents=True, exist_ok=True)
        cache = StageCache(
            cache_root() if options.use_cache else None,
            scratch_parent=out,
            lock_policy=options.lock,
            rehash=options.rehash,
        )
        if not options.use_cache:
            guard.claim(cache.root)
        inputs = hash_inputs(adapters, base_dir, cache.hashes)
        if options.force:  # an earlier export's manifest and reports must not describe this one
            for stale in (out / MANIFEST, *reports):
                stale.unlink(missing_ok=True)

        merge_key = stage_key(
            {
                "stage": "merge",
                "inputs": input_hashes({"inputs": inputs}),
                "dtype": options.dtype,
                "arithmetic": MERGE_ARITHMETIC,
                "versions": {k: versions[k] for k in ("edge-export", "torch", "safetensors")},
            }
        )

        def produce_merge(staging: Path, meta: dict[str, Any]) -> None:
            from exporter.merge import merge_adapters  # torch: imported when there is merging to do

            report(f"merging {len(adapters)} adapter(s) into {base_dir}")
            built = merge_adapters(
                base_dir,
                adapters,
                staging / MERGED_DIR,
                dtype=options.dtype,
                provenance=merge_provenance(inputs["adapters"], base_dir),
            )
            meta.update(
                files={f"{MERGED_DIR}/{shard}": digest for shard, digest in built.shard_sha256.items()},
                what=f"merged {name} ({built.dtype})",
                merged_tensors=built.merged_tensors,
                total_tensors=built.total_tensors,
                dtype=built.dtype,
                shards=built.shards,
                untied=built.untied_embeddings,
                max_abs=built.max_abs,
                dtype_reason=built.dtype_reason,
            )

        kill_point("merge")
        with _timed(seconds, "merge"):
            entry, reused = cache.get_or_build("merge", merge_key, produce_merge, label="merge")
            if reused:
                cached.append("merge")
                report("merge: reusing the cached merged model")
            link_into(entry.path / MERGED_DIR, guard.claim(out / MERGED_DIR))
        kill_point("merge:done")
        meta = entry.meta
        merged = MergeResult(
            out / MERGED_DIR,
            meta["merged_tensors"],
            meta["total_tensors"],
            meta["dtype"],
            meta["shards"],
            meta["untied"],
            max_abs=meta.get("max_abs"),
            dtype_reason=meta.get("dtype_reason", ""),
        )
        source_ftype = merged.gguf_ftype
        _check_float16_range(merged, [p for p in profiles if not p.is_source(source_ftype)], base_dir)
        f16_path = out / f"{name}-{source_ftype}.gguf"
        if options.force:  # an earlier export of this name may have converted to the other 16-bit type
            for stale in source_paths:
                if stale != f16_path and stale.name not in (p.name for p in planned_ggufs.values()):
                    stale.unlink(missing_ok=True)
        # The chat template is translated while the converter (a child process) runs, and a template
        # that cannot be translated stops the export before the quantizations.
        chat_future = side_work.submit(_chat_stage, cache, merge_key, merged.path)

        convert_key = stage_key(
            {
                "stage": "convert",
                "merge": merge_key,
                "llama.cpp": vendored.commit,
                "outtype": source_ftype.lower(),
                "name": name,
            }
        )

        def produce_f16(staging: Path, meta: dict[str, Any]) -> None:
            report(f"converting to GGUF with llama.cpp {vendored.commit[:9]}")
            start = time.perf_counter()
            digest = convert_hf_to_gguf(
                merged.path, staging / "model.gguf", vendored, model_name=name, outtype=source_ftype.lower()
            )
            meta.update(
                seconds=round(time.perf_counter() - start, 3),
                what=f"{name} {source_ftype} GGUF",
                files={"model.gguf": digest},
                header=asdict(read_gguf_header(staging / "model.gguf")),
            )

        kill_point("convert")
        with _timed(seconds, "convert"):
            entry, reused = cache.get_or_build("convert", convert_key, produce_f16, label="convert")
            if reused:
                cached.append("convert")
                report(f"convert: reusing the cached {source_ftype} GGUF")
            link_into(entry.path / "model.gguf", guard.claim(f16_path))
        kill_point("convert:done")
        spec, chat_template = chat_future.result()
        # Tokenizer parity needs only the F16 GGUF's vocabulary: checked while the quantizations run.
        parity_future = side_work.submit(_parity_stage, cache, convert_key, merged.path, f16_path)
        f16_profile = registry.get(source_ftype)
        headers = {f16_path: _entry_header(entry)}
        f16_artifact = _artifact(
            f16_path, f16_profile, entry.meta["seconds"], entry.meta["files"]["model.gguf"], headers[f16_path]
        )
        to_quantize = [p for p in profiles if not p.is_source(source_ftype)]
        imatrix = None
        if options.has_imatrix and to_quantize:
            with _timed(seconds, "imatrix"):
                imatrix = _imatrix_stage(
                    cache,
                    guard,
                    options,
                    vendored,
                    versions,
                    merged.path,
                    f16_path,
                    convert_key,
                    name,
                    report,
                )
                if imatrix.reused:
                    cached.append("imatrix")
        jobs = max(1, min(options.jobs, len(to_quantize)))
        # Each parallel quantization gets every core and the OS shares them: quantizations differ in
        # length, and a fixed split leaves cores idle once the short ones end (1.2B model, 2 cores,
        # Q4_K_M + Q8_0 at once: 74 s with a thread each, 47 s with two each, 48 s one after the
        # other). llama.cpp's output does not depend on the thread count.
        threads = options.threads or os.cpu_count() or 1

        def quantize_stage(profile: QuantProfile) -> GGUFArtifact:
            target = planned_ggufs[profile.name]
            quantize_key = stage_key(
                {
                    "stage": "quantize",
                    "convert": convert_key,
                    "llama-cpp-python": versions["llama-cpp-python"],
                    "ftype": profile.ftype,
                    "overrides": profile.overrides.model_dump(mode="json"),
                    "imatrix": imatrix.key if imatrix else None,
                }
            )
            start = time.perf_counter()
            kill_point(f"quantize:{profile.name}")

            def produce(staging: Path, meta: dict[str, Any]) -> None:
                report(f"quantizing to {profile.name}")
                quantize_gguf(
                    f16_path,
                    staging / "model.gguf",
                    profile,
                    threads,
                    imatrix=imatrix.cached if imatrix else None,
                    metadata=imatrix.gguf_metadata() if imatrix else None,
                )
                meta.update(
                    seconds=round(time.perf_counter() - start, 3),
                    what=f"{name} {profile.name} GGUF",
                    header=asdict(read_gguf_header(staging / "model.gguf")),
                )

            entry, reused = cache.get_or_build(
                "quantize", quantize_key, produce, label=f"quantize:{profile.name}"
            )
            if reused:
                cached.append(f"quantize {profile.name}")
            link_into(entry.path / "model.gguf", guard.claim(target))
            kill_point(f"quantize:{profile.name}:done")
            seconds[f"quantize {profile.name}"] = round(time.perf_counter() - start, 3)
            headers[target] = header = _entry_header(entry)
            return _artifact(
                target, profile, entry.meta["seconds"], entry.meta["files"]["model.gguf"], header
            )

        with ThreadPoolExecutor(max_workers=jobs) as pool:  # each quantization runs in its own child process
            names = [p.name for p in to_quantize]
            quantized = dict(zip(names, pool.map(quantize_stage, to_quantize), strict=True))
        artifacts = {
            p.name: f16_artifact if p.is_source(source_ftype) else quantized[p.name] for p in profiles
        }
        if cached:
            report(f"reused from the cache: {', '.join(cached)}")
        report("checking the tokenizer: HF against llama.cpp, and each GGUF's chat template")
        ggufs = [f16_path, *(a.path for a in artifacts.values())]
        check_embedded_chat_template(chat_template, merged.path, ggufs, headers)
        parity = parity_future.result()
        report(parity.summary())
        report("writing Modelfiles and manifest")
        license_text = model_license(merged.path)
        kill_point("modelfiles")
        modelfiles = []
        for profile in profiles:
            target = guard.claim(planned_modelfiles[profile.name])
            write_modelfile(
                target,
                artifacts[profile.name].path,
                spec,
                f"{name} ({profile.name}), written by edge-export {__version__}",
                license_text,
            )
            modelfiles.append(target)
        kill_point("manifest")
        manifest = _write_manifest(
            out,
            name,
            options,
            versions,
            inputs,
            merged,
            f16_artifact,
            artifacts,
            spec,
            modelfiles,
            seconds,
            cached,
            parity,
            imatrix,
        )
        cache.close()
    except BaseException:  # Ctrl-C included: nothing half-done may stay behind
        side_work.shutdown(wait=True, cancel_futures=True)
        guard.rollback()
        raise
    side_work.shutdown()
    notes = [n for n in (spec.note, None if parity.passed else parity.summary()) if n]
    result = ExportResult(
        out, name, list(artifacts.values()), modelfiles, manifest, seconds, notes, imatrix=imatrix
    )
    if options.check:
        # After the manifest: a failure here (even a native crash) leaves the finished export intact.
        kill_point("check")
        report("checking quality against the unmerged reference")
        manifest_data = json.loads(manifest.read_text())
        with _timed(seconds, "check"):
            result.quality = check_artifacts(
                manifest_data,
                out,
                base_dir,
                adapters,
                merged.path,
                registry,
                options.quality,
                report,
                stage_cache=StageCache(cache_root()) if options.use_cache else None,
            )
        manifest_data["stage_seconds"] = seconds
        manifest_data["quality"] = {"report": REPORT_JSON, "passed": result.quality.passed}
        _atomic_json(manifest, manifest_data)
    return result


def _check_float16_range(merged: MergeResult, profiles: list[QuantProfile], base_dir: Path) -> None:
    """A float16 GGUF made from a bfloat16 or float32 merge must not overflow to Inf."""
    if merged.gguf_ftype == "F16" and not merged.fits_float16:  # a --dtype float32 merge
        raise InputError(
            f"The merged model holds values up to {merged.max_abs:.6g}, beyond float16's range (±65504), and "
            f"the converter writes {merged.dtype} merges as F16, which would hold Inf there. Pass --dtype "
            "bfloat16 (or leave --dtype out: a bfloat16 base that does not fit float16 stays bfloat16)."
        )
    wanted = [p.name for p in profiles if p.ftype == "F16" or "F16" in p.overrides.tensor_types.values()]
    if wanted and not merged.fits_float16:
        raise InputError(
            f"The merged model holds values up to {merged.max_abs:.6g}, beyond float16's range (±65504), so "
            f"{', '.join(wanted)} would hold Inf where the model has large weights (the base {base_dir} is "
            f"{merged.dtype}). Ask for BF16 instead, or a quantized profile (Q8_0, Q4_K_M, …), which keep the range."
        )


def _imatrix_stage(
    cache: StageCache,
    guard: _OutputGuard,
    options: ExportOptions,
    vendored: VendoredLlamaCpp,
    versions: dict[str, str],
    merged_dir: Path,
    f16_path: Path,
    convert_key: str,
    name: str,
    report: Reporter,
) -> ImatrixStage:
    """The importance matrix from --calibration (cached), or the one given with --imatrix (checked
    against the F16 GGUF), published as <name>.imatrix.gguf."""
    if options.imatrix is not None:
        return _given_imatrix_stage(cache, guard, options.imatrix, f16_path, convert_key, name, report)
    assert options.calibration is not None
    calibration_sha256 = cache.hashes.sha256(options.calibration)
    dtype = activation_dtype(merged_dir)
    key = stage_key(
        {
            "stage": "imatrix",
            "convert": convert_key,
            "calibration": calibration_sha256,
            "max_tokens": options.calibration_tokens,
            "dtype": dtype,
            "versions": {k: versions[k] for k in ("edge-export", "torch", "transformers")},
        }
    )

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        report(f"computing the importance matrix from {options.calibration}")
        result = compute_imatrix(
            merged_dir,
            f16_path,
            options.calibration,  # type: ignore[arg-type]
            staging / "imatrix.gguf",
            vendored,
            max_tokens=options.calibration_tokens,
            threads=options.threads,
            dtype=dtype,
        )
        meta.update(result.to_json(), what=f"{name} importance matrix")

    return _publish_imatrix(cache, guard, name, key, produce, options.calibration, calibration_sha256)


def _given_imatrix_stage(
    cache: StageCache,
    guard: _OutputGuard,
    given: Path,
    f16_path: Path,
    convert_key: str,
    name: str,
    report: Reporter,
) -> ImatrixStage:
    """--imatrix FILE: checked against this model's F16 GGUF once, then cached like a computed one."""
    given_sha256 = cache.hashes.sha256(given)
    key = stage_key({"stage": "imatrix-given", "convert": convert_key, "sha256": given_sha256})

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        report(f"checking the importance matrix {given}")
        info = read_imatrix_file(given, f16_path)
        shutil.copyfile(given, staging / "imatrix.gguf")
        meta.update(info, what=f"{name} importance matrix (given)", files={"imatrix.gguf": given_sha256})

    return _publish_imatrix(cache, guard, name, key, produce, given, given_sha256, given=True)


# What the manifest records of an importance matrix ("dataset" only for a given one).
IMATRIX_RECORD = ("entries", "tokens", "chunks", "dataset", "skipped", "seconds", "dtype")


def _publish_imatrix(
    cache: StageCache,
    guard: _OutputGuard,
    name: str,
    key: str,
    produce: Callable[[Path, dict[str, Any]], None],
    source: Path,
    source_sha256: str,
    given: bool = False,
) -> ImatrixStage:
    """Build (or reuse) the imatrix cache entry and link it into the output as <name>.imatrix.gguf."""
    kill_point("imatrix")
    entry, reused = cache.get_or_build("imatrix", key, produce, label="imatrix")
    output = guard.claim(guard.out / f"{name}.imatrix.gguf")
    link_into(entry.path / "imatrix.gguf", output)
    kill_point("imatrix:done")
    return ImatrixStage(
        key,
        entry.path / "imatrix.gguf",
        output,
        entry.meta["files"]["imatrix.gguf"],
        source,
        source_sha256,
        {k: entry.meta[k] for k in IMATRIX_RECORD if k in entry.meta},
        reused,
        given=given,
    )


def _chat_stage(cache: StageCache, merge_key: str, merged_dir: Path) -> tuple[ChatSpec, str | None]:
    """The verified chat-template translation of the merged folder, and its Jinja template (cached:
    loading the tokenizer and rendering the probe conversations costs seconds)."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir), local_files_only=True)
        spec = chat_spec(merged_dir, tokenizer=tokenizer)
        meta.update(spec=asdict(spec), chat_template=tokenizer.chat_template or None, what="chat template")

    key = stage_key({"stage": "chat", "merge": merge_key, "edge-export": __version__})
    kill_point("chat")
    entry, _ = cache.get_or_build("chat", key, produce, label="chat")
    kill_point("chat:done")
    spec = entry.meta["spec"]
    return ChatSpec(**{**spec, "stops": tuple(spec["stops"])}), entry.meta["chat_template"]


def _parity_stage(cache: StageCache, convert_key: str, merged_dir: Path, f16_path: Path) -> ParityReport:
    """Tokenizer parity of the merged folder and its F16 GGUF (cached: every quantized GGUF carries the
    same vocabulary)."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        meta.update(parity=check_tokenizer_parity(merged_dir, f16_path).to_json(), what="tokenizer parity")

    key = stage_key({"stage": "parity", "convert": convert_key, "edge-export": __version__})
    kill_point("parity")
    entry, _ = cache.get_or_build("parity", key, produce, label="parity")
    kill_point("parity:done")
    recorded = {k: v for k, v in entry.meta["parity"].items() if k != "passed"}
    return ParityReport(**recorded)


def input_hashes(manifest: dict[str, Any]) -> dict[str, Any]:
    """The inputs' content, without their paths: the cache key of the reference."""
    inputs = manifest["inputs"]
    return {
        "base": inputs["base"]["files"],
        "adapters": [{"files": a["files"], "weight": a["weight"]} for a in inputs["adapters"]],
    }


def check_artifacts(
    manifest: dict[str, Any],
    root: Path,
    base_dir: Path,
    adapters: list[LoraAdapter],
    tokenizer_dir: Path,
    registry: ProfileRegistry,
    options: QualityOptions,
    report: Reporter = lambda _: None,
    stage_cache: StageCache | None = None,
) -> QualitySummary:
    """Score every GGUF of a manifest against the unmerged reference, apply gates, write the reports."""
    overrides = parse_gate_overrides(options.gates)
    reference = build_reference(base_dir, adapters, tokenizer_dir, input_hashes(manifest), options)
    report(
        f"reference: {reference.eval.n_scored} tokens from {reference.eval.source}"
        + (" (cached)" if reference.cached else f" ({reference.seconds:.0f}s)")
    )
    records = {r["profile"]: r for r in [*manifest.get("intermediates", []), *manifest["artifacts"]]}
    items = []
    for label, record in records.items():
        path = root / record["path"]
        report(f"evaluating {path.name}")
        quality_key = stage_key(
            {
                "stage": "quality",
                "artifact": record["sha256"],
                "reference": reference.key,
                "device": options.gguf_device,
                "llama-cpp-python": manifest.get("tools", {}).get("llama-cpp-python"),
            }
        )
        kill_point(f"quality:{label}")
        entry = stage_cache.lookup("quality", quality_key) if stage_cache else None
        if entry is not None:
            metrics = entry.meta["metrics"]
        else:
            try:
                metrics = evaluate_gguf(path, reference, options)
            except StageError as exc:  # a crash in one artifact's evaluation fails that artifact, not the run
                metrics = {"error": str(exc)}
            if stage_cache and "error" not in metrics:
                with stage_cache.build("quality", quality_key, label=f"quality:{label}") as (_, meta):
                    meta.update(metrics=metrics, what=f"quality of {path.name}")
        kill_point(f"quality:{label}:done")
        profile = registry.get(label)
        gates = (
            apply_gates(profile, metrics, overrides)
            if "error" not in metrics
            else [GateResult(label, "evaluation", 0.0, None, False)]
        )
        items.append(
            ArtifactQuality(label, path, record["size_bytes"], record["bits_per_weight"], metrics, gates)
        )
    items.sort(key=lambda item: -item.size_bytes)  # largest (closest to the fine-tune) first
    floor = ArtifactQuality("base (no adapter)", None, 0, None, reference.base_metrics)
    sources = {
        "tools": manifest.get("tools", {}),
        "base": manifest["inputs"]["base"]["path"],
        "adapters": [{"path": a["path"], "weight": a["weight"]} for a in manifest["inputs"]["adapters"]],
    }
    data = report_data(manifest.get("name", root.name), root, reference, options, items, floor, sources)
    reports = write_reports(root, data)
    return QualitySummary(items, floor, reports, reference.seconds, reference.cached)


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def hash_inputs(adapters: list[LoraAdapter], base_dir: Path, memo: HashMemo | None = None) -> dict[str, Any]:
    """Every input file's sha256, with the folders and weights: the manifest's "inputs"."""
    return {
        "adapters": adapter_records(adapters, memo),
        "base": {
            "path": str(base_dir.resolve()),
            "files": hash_files(_input_files(base_dir), base_dir, memo),
        },
    }


def _precision_record(merged: MergeResult) -> dict[str, Any]:
    """What precision the merge and the converter wrote in, and why (the manifest's "precision")."""
    return {
        "merged": merged.dtype,
        "gguf": merged.gguf_ftype,
        "why": merged.dtype_reason,
        "fits_float16": merged.fits_float16,
    }


def _write_manifest(
    out: Path,
    name: str,
    options: ExportOptions,
    versions: dict[str, str],
    inputs: dict[str, Any],
    merged: MergeResult,
    f16: GGUFArtifact,
    artifacts: dict[str, GGUFArtifact],
    spec: ChatSpec,
    modelfiles: list[Path],
    seconds: dict[str, float],
    cached: list[str],
    parity: ParityReport,
    imatrix: ImatrixStage | None = None,
) -> Path:
    manifest: dict[str, Any] = {
        "format": "edge-export/manifest/1",
        "name": name,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": versions,
        "options": {
            "profiles": [a.profile for a in artifacts.values()],
            "dtype": merged.dtype,
            "threads": options.threads,
            "profile_files": [str(p) for p in options.profile_files],
            "cache": options.use_cache,
            "allow_pickle": options.allow_pickle,
            "trust_remote_code": options.trust_remote_code,
            "reference_dtype": options.quality.reference_dtype,
        },
        "inputs": inputs,
        "merge": {
            "path": MERGED_DIR,
            "merged_tensors": merged.merged_tensors,
            "total_tensors": merged.total_tensors,
            "dtype": merged.dtype,
            "shards": merged.shards,
            "max_abs": merged.max_abs,
        },
        "precision": _precision_record(merged),
        "intermediates": [f16.to_json(out)],
        "artifacts": [a.to_json(out) for a in artifacts.values()],
        "modelfiles": [
            {
                "path": m.name,
                "chat_template_family": spec.family,
                "stops": list(spec.stops),
                "verified_conversations": spec.verified_conversations,
            }
            for m in modelfiles
        ],
        "tokenizer_parity": parity.to_json(),
        "stage_seconds": seconds,
        "cached_stages": cached,
    }
    if imatrix is not None:
        manifest["imatrix"] = imatrix.to_json(out)
    if spec.note:
        manifest["notes"] = [spec.note]
    target = out / MANIFEST
    _atomic_json(target, manifest)
    return target


@dataclass(frozen=True)
class CheckOptions:
    """What `edge-export check` was asked to do."""

    manifest: Path
    baseline: Path | None = None
    junit: Path | None = None
    quality: QualityOptions = field(default_factory=QualityOptions)
    kld_tolerance: float = 0.10  # relative growth of mean KLD allowed against the baseline
    max_memory: int | None = None  # bytes; None = no budget
    reference_dtype_fixed: bool = True  # False: --max-memory may switch the reference to bfloat16
    top1_tolerance: float = 0.005  # absolute drop of top-1 agreement allowed against the baseline


@dataclass(frozen=True)
class BaselineComparison:
    label: str
    metric: str
    baseline: float
    current: float | None
    allowed: float
    passed: bool


@dataclass
class CheckResult:
    summary: QualitySummary
    baseline: list[BaselineComparison]
    junit: Path | None

    @property
    def passed(self) -> bool:
        return self.summary.passed and all(c.passed for c in self.baseline)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(
            f"The manifest {path} does not exist. Pass the manifest.json that merge-quantize wrote."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc}); pass the manifest.json that merge-quantize wrote."
        ) from exc
    if manifest.get("format") != "edge-export/manifest/1":
        raise InputError(f"{path} is not an edge-export manifest (format {manifest.get('format')!r}).")
    return manifest


def check_manifest(options: CheckOptions, report: Reporter = lambda _: None) -> CheckResult:
    """Re-evaluate an export for CI: verify files, score against the reference, gates, baseline, JUnit."""
    manifest = _read_manifest(options.manifest)
    root = options.manifest.parent
    for record in [*manifest.get("intermediates", []), *manifest["artifacts"]]:
        path = root / record["path"]
        if not path.is_file():
            raise InputError(f"{path}, listed in {options.manifest}, is missing. Re-run merge-quantize.")
        if sha256_file(path) != record["sha256"]:
            raise InputError(
                f"{path} has changed since {options.manifest} was written (its sha256 differs). Re-run "
                "merge-quantize to re-export, or restore the file."
            )
    inputs = manifest["inputs"]
    base_dir = Path(inputs["base"]["path"])
    # A pickle adapter is read again only if the export itself was allowed to read it.
    allow_pickle = bool(manifest.get("options", {}).get("allow_pickle", False))
    adapters = [read_adapter(Path(a["path"]), a["weight"], allow_pickle) for a in inputs["adapters"]]
    for folder, recorded in [
        (base_dir, inputs["base"]["files"]),
        *[(a.path, r["files"]) for a, r in zip(adapters, inputs["adapters"], strict=True)],
    ]:
        if not folder.is_dir() or hash_files(_input_files(folder), folder) != recorded:
            raise InputError(
                f"{folder} is not the input {options.manifest} was exported from (missing or changed files), so "
                "the reference would not be the fine-tune these GGUFs came from. Re-run merge-quantize."
            )
    merged = root / manifest.get("merge", {}).get("path", MERGED_DIR)
    tokenizer_dir = merged if (merged / "tokenizer_config.json").is_file() else base_dir
    files = tuple(Path(p) for p in manifest.get("options", {}).get("profile_files", []))
    registry, _ = resolve_profiles((), files)
    quality = replace(
        options.quality, trust_remote_code=bool(manifest.get("options", {}).get("trust_remote_code"))
    )
    if options.max_memory:
        largest = max(r["size_bytes"] for r in [*manifest.get("intermediates", []), *manifest["artifacts"]])
        quality, estimates = fit_check(
            base_dir, adapters, quality, options.max_memory, options.reference_dtype_fixed, largest
        )
        report("memory: " + ", ".join(f"{e.stage} about {e.peak_bytes >> 20} MiB" for e in estimates))
    summary = check_artifacts(manifest, root, base_dir, adapters, tokenizer_dir, registry, quality, report)
    comparisons = compare_with_baseline(summary, options) if options.baseline else []
    junit = write_junit(options.junit, summary, comparisons) if options.junit else None
    return CheckResult(summary, comparisons, junit)


def compare_with_baseline(summary: QualitySummary, options: CheckOptions) -> list[BaselineComparison]:
    assert options.baseline is not None
    try:
        baseline = json.loads(options.baseline.read_text())
        rows = {row["label"]: row["metrics"] for row in baseline["artifacts"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(
            f"The baseline {options.baseline} is not a report.json written by edge-export ({exc})."
        ) from exc
    comparisons = []
    for item in summary.items:
        old = rows.get(item.label)
        if old is None or "mean_kld" not in old:
            continue
        kld, top1 = item.metrics.get("mean_kld"), item.metrics.get("top1")
        kld_limit = old["mean_kld"] * (1 + options.kld_tolerance) + 1e-6
        top1_limit = old["top1"] - options.top1_tolerance
        comparisons += [
            BaselineComparison(
                item.label, "mean_kld", old["mean_kld"], kld, kld_limit, kld is not None and kld <= kld_limit
            ),
            BaselineComparison(
                item.label, "top1", old["top1"], top1, top1_limit, top1 is not None and top1 >= top1_limit
            ),
        ]
    return comparisons


def write_junit(target: Path, summary: QualitySummary, comparisons: list[BaselineComparison]) -> Path:
    """JUnit XML: one test case per gate and per baseline comparison, so CI systems show each."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name="edge-export check")
    count = failures = 0
    for item in summary.items:
        for gate in item.gates:
            case = ET.SubElement(suite, "testcase", classname=f"edge-export.{item.label}", name=gate.gate)
            count += 1
            if not gate.passed:
                failures += 1
                detail = item.metrics.get("error") or f"{gate.gate}: {gate.value} against limit {gate.limit}"
                detail += f" {gate_diagnosis(item.label)}" if gate_diagnosis(item.label) else ""
                ET.SubElement(case, "failure", message=detail[:500]).text = detail
    for comparison in comparisons:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"edge-export.{comparison.label}",
            name=f"baseline {comparison.metric}",
        )
        count += 1
        if not comparison.passed:
            failures += 1
            ET.SubElement(
                case,
                "failure",
                message=(
                    f"{comparison.metric} {comparison.current} against baseline {comparison.baseline} "
                    f"(allowed {comparison.allowed:.6g})"
                ),
            )
    suite.set("tests", str(count))
    suite.set("failures", str(failures))
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(target) as partial:
        tree.write(partial, encoding="utf-8", xml_declaration=True)
    return target
