"""convert and quantize: the merged folder (or a bare base) ──▶ a 16-bit GGUF ──▶ one GGUF per profile."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from converters.gguf_header import GGUFHeader, read_gguf_header
from converters.hf_to_gguf import convert_hf_to_gguf
from converters.pretokenizer import grown_from
from converters.quantize import quantize_gguf
from exporter.core.errors import StageError
from exporter.engine.run import Run
from exporter.engine.stage_cache import CacheEntry, link_into
from exporter.engine.stage_keys import convert_key, mmproj_key, quantize_key
from exporter.inputs.artifacts import GGUFArtifact
from exporter.inputs.records import BuiltGGUF, MergedModel
from exporter.quality.imatrix import ImatrixStage
from quant_profiles import QuantProfile

GGUF_FILE = "model.gguf"


def entry_header(entry: CacheEntry) -> GGUFHeader:
    """The header facts of a cached GGUF: recorded when the entry was built (reading them again means
    walking the whole vocabulary), or read from the file for entries recorded without them."""
    known = entry.meta.get("header")
    return GGUFHeader(**known) if isinstance(known, dict) else read_gguf_header(entry.path / GGUF_FILE)


def gguf_record(entry: CacheEntry, target: Path | None, profile: QuantProfile) -> BuiltGGUF:
    """The record of a GGUF linked at `target` from a verified cache entry (None: the cached file
    itself); its header must say what the profile asked for."""
    target = target or entry.path / GGUF_FILE
    header = entry_header(entry)
    if header.file_type != profile.ftype_id:
        raise StageError(
            f"{target} carries file type {header.file_type_name} in its GGUF header, but profile {profile.name} "
            f"asked for {profile.ftype}; the quantizer did not do what was asked."
        )
    return built_record(entry, target, profile.name, header)


def built_record(entry: CacheEntry, target: Path, label: str, header: GGUFHeader) -> BuiltGGUF:
    """The record of the GGUF at `target` (the cache entry's file, or a link to it), called `label`."""
    size = target.stat().st_size
    artifact = GGUFArtifact(
        path=target,
        profile=label,
        file_type=header.file_type_name,
        size_bytes=size,
        bits_per_weight=round(size * 8 / max(header.n_params, 1), 3),
        sha256=entry.meta["files"][GGUF_FILE],
        seconds=round(entry.meta["seconds"], 3),
    )
    return BuiltGGUF(artifact, entry.key, entry.path / GGUF_FILE, header)


def convert_stage(
    run: Run,
    name: str,
    key: str,
    model_dir: Path,
    model_name: str,
    profile: QuantProfile,
    target: Path | None,
    metadata: dict[str, str] | None = None,
    base_dir: Path | None = None,
) -> BuiltGGUF | CacheEntry:
    """The unquantized GGUF of `model_dir` (profile F16, BF16 or the F32 master); linked at `target` when
    one is given, else the cache entry alone (a bare base, published per profile). `base_dir`: the base a
    merged folder was made from, whose tokenizer names the pre-tokenizer of one that only grew added tokens."""
    outtype = profile.ftype.lower()

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"converting {model_dir} to GGUF with llama.cpp {run.vendored.commit[:9]}")
        grown = None if base_dir is None else grown_from(model_dir, base_dir)
        if grown:
            run.report(
                f"the tokenizer is {base_dir}'s with {grown} more added tokens: where llama.cpp's table does "
                "not know its hash, the base tokenizer's names the pre-tokenizer (tokenizer parity checks it)"
            )
        start = time.perf_counter()
        digest = convert_hf_to_gguf(
            model_dir,
            staging / GGUF_FILE,
            run.vendored,
            model_name,
            outtype=outtype,
            metadata=metadata,
            pre_tokenizer_from=base_dir if grown else None,
        )
        meta.update(
            seconds=round(time.perf_counter() - start, 3),
            what=f"{model_name} {profile.ftype} GGUF" + (" (unmerged base)" if metadata else ""),
            files={GGUF_FILE: digest},
            header=asdict(read_gguf_header(staging / GGUF_FILE)),
        )

    entry = run.stage(name, "convert", key, produce, {GGUF_FILE: target} if target else {})
    if name in run.reused:
        run.report(f"{name}: reusing the cached {profile.ftype} GGUF")
    return gguf_record(entry, target, profile) if target else entry


def quantize_stage(
    run: Run,
    name: str,
    source: Path,
    source_key: str,
    profile: QuantProfile,
    target: Path | None,
    imatrix: ImatrixStage | None = None,
    runtime_base: bool = False,
    label: str | None = None,
) -> BuiltGGUF:
    """`source` (a cached 16-bit GGUF) quantized to `profile`, linked at `target` (None: left in the
    cache, called `label`)."""
    key = quantize_key(
        source_key,
        run.versions["llama-cpp-python"],
        profile.ftype,
        profile.overrides.model_dump(mode="json"),
        imatrix.key if imatrix else None,
        runtime_base=runtime_base,
    )
    # Each parallel quantization gets every core and the OS shares them: quantizations differ in
    # length, and a fixed split leaves cores idle once the short ones end (1.2B model, 2 cores,
    # Q4_K_M + Q8_0 at once: 74 s with a thread each, 47 s with two each, 48 s one after the
    # other). llama.cpp's output does not depend on the thread count.
    threads = run.options.threads or os.cpu_count() or 1
    stem = target.stem if target else (label or profile.name)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"quantizing {stem} to {profile.name}")
        start = time.perf_counter()
        quantize_gguf(
            source,
            staging / GGUF_FILE,
            profile,
            threads,
            imatrix=imatrix.cached if imatrix else None,
            metadata=imatrix.gguf_metadata() if imatrix else None,
        )
        meta.update(
            seconds=round(time.perf_counter() - start, 3),
            what=f"{stem} GGUF",
            header=asdict(read_gguf_header(staging / GGUF_FILE)),
        )

    entry = run.stage(name, "quantize", key, produce, {GGUF_FILE: target} if target else {})
    return gguf_record(entry, target, profile)


def publish_gguf(run: Run, entry: CacheEntry, target: Path, profile: QuantProfile) -> BuiltGGUF:
    """Link an already built 16-bit GGUF into the output as the file of its own profile (F16, BF16)."""
    link_into(entry.path / GGUF_FILE, run.guard.claim(target))
    return gguf_record(entry, target, profile)


def merged_convert_key(run: Run, merge_key: str, ftype: str, model_name: str) -> str:
    """The key of a merged folder's conversion to its unquantized `ftype` (F16, BF16 or the F32 master)."""
    return convert_key(merge_key, run.vendored.commit, ftype.lower(), model_name)


def convert_merged(
    run: Run,
    name: str,
    merged: MergedModel,
    model_name: str,
    target: Path,
    profile: QuantProfile,
    base_dir: Path,
) -> BuiltGGUF:
    """A merged folder's unquantized GGUF (`profile`: F16, BF16 or F32, as the merge decided), at `target`;
    `base_dir` is the base it was merged from."""
    key = merged_convert_key(run, merged.key, profile.ftype, model_name)
    built = convert_stage(run, name, key, merged.path, model_name, profile, target, base_dir=base_dir)
    assert isinstance(built, BuiltGGUF)
    return built


def quantize_from(
    run: Run,
    name: str,
    source: BuiltGGUF,
    profile: QuantProfile,
    target: Path,
    imatrix: ImatrixStage | None = None,
) -> BuiltGGUF:
    """`source` quantized to `profile`; a profile that is the source's own type is the source itself."""
    if profile.is_source(source.artifact.profile):
        return source
    return quantize_stage(run, name, source.cached, source.key, profile, target, imatrix)


def mmproj_stage(
    run: Run, model_dir: Path, source_key: str, model_name: str, target: Path, mmproj_type: str
) -> BuiltGGUF:
    """A vision-language model's multimodal projector (vision tower + projector) as a GGUF of `mmproj_type`
    (F16 or Q8_0, the converter's own choice per tensor), written from `model_dir` (a merged folder, or a
    bare base whose files `source_key` names), at `target`."""
    key = mmproj_key(source_key, run.vendored.commit, mmproj_type.lower(), model_name)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(
            f"converting the vision tower and projector of {model_dir} to an mmproj GGUF ({mmproj_type})"
        )
        start = time.perf_counter()
        digest = convert_hf_to_gguf(
            model_dir,
            staging / GGUF_FILE,
            run.vendored,
            model_name,
            outtype=mmproj_type.lower(),
            mmproj=True,
        )
        meta.update(
            seconds=round(time.perf_counter() - start, 3),
            what=f"{model_name} mmproj {mmproj_type} GGUF",
            files={GGUF_FILE: digest},
            header=asdict(read_gguf_header(staging / GGUF_FILE)),
        )

    entry = run.stage("mmproj", "mmproj", key, produce, {GGUF_FILE: target})
    return built_record(entry, target, f"mmproj-{mmproj_type}", entry_header(entry))
