"""Checks that run before any work: custom code, architecture, tokenizer, output folder, disk space.

An export that is bound to fail should fail in the first second with a message that names the
file and the fix, not after the merge has written gigabytes, or when the disk fills up midway.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.vendor import VendoredLlamaCpp
from exporter.core.errors import InputError
from exporter.core.units import human_size
from exporter.engine.memory import fit_check, fit_merge
from exporter.inputs.adapter import LoraAdapter, tokenizer_source
from exporter.inputs.base_config import read_base_config
from exporter.inputs.mlx_adapter import rope_note
from exporter.inputs.safetensors_header import (
    DTYPE_ALIASES,
    ELEMENT_SIZES,
    base_shard_files,
    read_header,
)
from exporter.inputs.semantics import check_semantics
from exporter.inputs.vision import check_vision_base, is_vision_language
from quant_profiles import QuantProfile

if TYPE_CHECKING:
    from exporter.inputs.options import ExportingOptions, QualityOptions

# For tests and for users who know better: the free bytes to assume on every file system.
FREE_DISK_ENV = "EDGE_EXPORT_FREE_DISK_BYTES"
# Quantized files hold more than their nominal bits per weight (token embeddings and the output
# tensor are kept at higher precision, plus metadata); the plan leaves this margin.
QUANT_MARGIN = 1.2
EMBEDDING_BITS = 6.56  # llama.cpp's Q6_K, the type K-quant mixes give the output tensor
TOKENIZER_WEIGHTS = ("tokenizer.json", "tokenizer.model")


def check_custom_code(base_dir: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse a base that needs its own Python code (`auto_map`) unless the user trusts it."""
    if config.get("auto_map") and not trust_remote_code:
        classes = ", ".join(sorted(str(v) for v in dict(config["auto_map"]).values()))
        raise InputError(
            f"{base_dir / 'config.json'} has an auto_map ({classes}): loading this model runs Python code that "
            "ships with it, which edge-export never does by default. Read that code, then pass "
            "--trust-remote-code to allow it, or use a base that transformers supports natively."
        )


@cache
def supported_architectures(convert_package: Path, table: str = "TEXT_MODEL_MAP") -> frozenset[str]:
    """The architectures llama.cpp's converter registers in `table` (read from its source, not imported):
    TEXT_MODEL_MAP for language models, MMPROJ_MODEL_MAP for the projectors of vision-language models."""
    tree = ast.parse((convert_package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == table
            and isinstance(node.value, ast.Dict)
        ):
            return frozenset(str(k.value) for k in node.value.keys if isinstance(k, ast.Constant))
    return frozenset()


def check_architecture(base_dir: Path, config: dict[str, Any], vendored: VendoredLlamaCpp) -> None:
    """Refuse an architecture the vendored converter cannot convert, before the merge (for a
    vision-language base: both its language model and its projector)."""
    package = vendored.convert_hf_script.parent / "conversion"
    known = supported_architectures(package)
    if not known:  # a converter laid out differently: let the conversion itself decide
        return
    if is_vision_language(config):
        revision = f"llama.cpp {vendored.commit[:9]}"
        projectors = supported_architectures(package, "MMPROJ_MODEL_MAP")
        check_vision_base(base_dir, config, known, projectors, revision)
        return
    architectures = config.get("architectures") or []
    if not any(arch in known for arch in architectures):
        named = ", ".join(architectures) if architectures else "none (config.json names no architectures)"
        raise InputError(
            f"The architecture {named} of {base_dir / 'config.json'} is not supported by llama.cpp "
            f"{vendored.commit[:9]} (llama-cpp-python {vendored.llama_cpp_python}), so it cannot be "
            "converted to GGUF. Use a supported architecture, or a newer edge-export release that pins a "
            "newer llama.cpp."
        )


def check_tokenizer(base_dir: Path, tokenizer_dir: Path) -> None:
    """The converter needs tokenizer.json or tokenizer.model; the merge copies them from these folders."""
    folders = dict.fromkeys([tokenizer_dir, base_dir])
    if not any((folder / name).is_file() for folder in folders for name in TOKENIZER_WEIGHTS):
        raise InputError(
            f"{base_dir} has no tokenizer files (neither {' nor '.join(TOKENIZER_WEIGHTS)}), so llama.cpp "
            "cannot build the GGUF's vocabulary. Copy the tokenizer files of the original model "
            "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) into that folder, or save them "
            "next to the adapter (tokenizer.save_pretrained)."
        )


def check_writable(out: Path) -> None:
    """Try to write where the output goes (a permission check alone would pass for root on a read-only mount)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} exists and is not a folder. Choose another --out.")
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    probe = probe_dir / f".edge-export-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise InputError(
            f"The output folder {probe_dir} is not writable ({exc.strerror}). Choose another --out or fix its "
            "permissions."
        ) from exc


@dataclass(frozen=True)
class DiskItem:
    what: str
    bytes: int


@dataclass(frozen=True)
class DiskPlan:
    """The bytes an export will add on each file system it writes to."""

    items: tuple[DiskItem, ...]
    needs: dict[Path, int]  # a folder on each file system -> bytes written there
    source: str = (
        "F16"  # the converter's output: F16, BF16, or "16-bit" where the merge's range check decides
    )

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)


def _merged_bytes(requested_dtype: str | None) -> int:
    """Bytes per weight of the merged model: --dtype's, else 16-bit (float16 or bfloat16)."""
    return ELEMENT_SIZES[requested_dtype] if requested_dtype else 2


def _float_elements(base_dir: Path) -> tuple[int, int, int, set[str]]:
    """Elements of the base's float tensors, of its embedding/output tensors, the bytes of the rest, and
    the float dtypes it stores."""
    floats = embeddings = other = 0
    dtypes: set[str] = set()
    for entry in (e for f in base_shard_files(base_dir) for e in read_header(f)):
        if entry.dtype in ("F16", "BF16", "F32"):
            count = math.prod(entry.shape)
            floats += count
            dtypes.add(entry.dtype)
            if entry.name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
                embeddings += count
        else:
            other += entry.nbytes
    return floats, embeddings, other, dtypes


def plan_disk(
    base_dir: Path,
    profiles: list[QuantProfile],
    out: Path,
    cache_dir: Path,
    requested_dtype: str | None = None,
    merged: str = "kept",
) -> DiskPlan:
    """Estimate what merge-quantize writes: merged model, F16 GGUF, one GGUF per profile (from its bits per
    weight), and where: the stage cache and hard links into the output, or copies across file systems.

    `requested_dtype` is --dtype as a safetensors dtype (F16, BF16, F32), or None. `merged`: "kept" (in
    the output and the cache), "released" once the 16-bit GGUF is written (the peak is then the larger
    of merged + 16-bit GGUF and 16-bit GGUF + quantized files), or "none" (not written at all)."""
    floats, embeddings, other, stored = _float_elements(base_dir)
    merged_bytes_per_weight = _merged_bytes(requested_dtype)
    # Which 16-bit type a bfloat16 base converts to is settled by the merge's range check.
    if requested_dtype in ("BF16", "F32"):
        source = requested_dtype
    else:  # a bfloat16 base beyond float16's range gets an F32 master: the plan counts 16 bits
        source = "F16" if requested_dtype or "BF16" not in stored else "16-bit"
    side = sum(f.stat().st_size for f in base_dir.iterdir() if f.is_file() and f.suffix != ".safetensors")
    merged_item = DiskItem(
        "merged model" + (" (until the 16-bit GGUF is written)" if merged == "released" else ""),
        floats * merged_bytes_per_weight + other + side,
    )
    gguf = DiskItem(f"{source} GGUF", floats * (4 if source == "F32" else 2) + other + side)
    items = [gguf] if merged == "none" else [merged_item, gguf]
    for profile in profiles:
        if profile.is_source(source if source in ("BF16", "F32") else "F16"):
            continue
        bits = (floats - embeddings) * profile.bits_per_weight + embeddings * max(
            EMBEDDING_BITS, profile.bits_per_weight
        )
        items.append(DiskItem(f"{profile.name} GGUF", int(bits / 8 * QUANT_MARGIN) + side))
    total = sum(item.bytes for item in items)
    if merged == "released":  # merged + GGUF while converting; GGUF + quantized files after
        total = max(merged_item.bytes + gguf.bytes, total - merged_item.bytes)
    cache_anchor, out_anchor = _existing(cache_dir), _existing(out)
    needs = {cache_anchor: total}
    if _device(cache_anchor) != _device(out_anchor):  # hard links cannot cross file systems: copies
        needs[out_anchor] = total
    return DiskPlan(tuple(items), needs, source)


def _existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), Path("/"))


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def free_bytes(folder: Path) -> int:
    override = os.environ.get(FREE_DISK_ENV)
    return int(override) if override else shutil.disk_usage(folder).free


def check_disk(plan: DiskPlan, max_disk: int | None = None) -> None:
    """Refuse to start when the planned outputs do not fit on a file system, or exceed --max-disk, with the
    estimate and the free space."""
    breakdown = ", ".join(f"{item.what} {human_size(item.bytes)}" for item in plan.items)
    peak = max(plan.needs.values())
    if max_disk is not None and peak > max_disk:
        raise InputError(
            f"This export needs about {human_size(peak)} of disk at its peak ({breakdown}), more than "
            f"--max-disk {human_size(max_disk)}. Raise --max-disk, ask for fewer profiles, or pass --no-check "
            "without --keep-merged (the merged weights are then released as soon as the 16-bit GGUF is written, "
            "before quantizing)."
        )
    for folder, needed in plan.needs.items():
        free = free_bytes(folder)
        if needed > free:
            raise InputError(
                f"Not enough free disk space in {folder}: this export needs about {human_size(needed)} ({breakdown}) "
                f"but only {human_size(free)} is free. Free some space, choose another --out, or point the stage "
                "cache elsewhere (EDGE_EXPORT_CACHE_DIR); `edge-export cache prune` removes old cached stages."
            )


def check_eval_data(path: Path | None, tokenizer_dir: Path) -> None:
    """Read and tokenize the evaluation data now, so an empty or broken file stops the run before any work."""
    from exporter.inputs.evaldata import load_eval_data
    from exporter.inputs.tokenizer import load_tokenizer

    load_eval_data(path, load_tokenizer(tokenizer_dir))


def check_inputs(
    base_dir: Path,
    adapters: list[LoraAdapter],
    vendored: VendoredLlamaCpp,
    trust_remote_code: bool,
    eval_data: Path | None,
    check: bool,
) -> list[str]:
    """The checks every command makes of its inputs, in the order a user would fix them; the notes of
    settings llama.cpp computes alike only up to a length (exporter.inputs.semantics)."""
    config = read_base_config(base_dir)
    check_custom_code(base_dir, config, trust_remote_code)
    check_architecture(base_dir, config, vendored)
    notes = check_semantics(base_dir, config, vendored.commit)
    notes += [n for a in adapters if a.origin and (n := rope_note(a.origin, config))]
    tokenizer_dir = tokenizer_source(adapters, base_dir)
    check_tokenizer(base_dir, tokenizer_dir)
    if check:
        check_eval_data(eval_data, tokenizer_dir)
    return notes


def fit_budget(
    budget: int | None,
    base_dir: Path,
    adapters: list[LoraAdapter],
    quality: QualityOptions,
    merged_bytes: int | None,
    gguf_bytes: int | None,
    report: Callable[[str], None],
) -> QualityOptions:
    """Stop now if the merge (when `merged_bytes` is given) or the check (when `gguf_bytes` is given) cannot
    fit --max-memory; the quality options to use (the reference may move to bfloat16 to fit)."""
    if not budget:
        return quality
    estimates = [fit_merge(base_dir, adapters, budget, merged_bytes)] if merged_bytes else []
    fitted = quality
    if gguf_bytes is not None:
        fitted, more = fit_check(
            base_dir, adapters, quality, budget, quality.reference_dtype_fixed, gguf_bytes
        )
        estimates += more
    report(
        f"memory budget {human_size(budget)}: "
        + ", ".join(f"{e.stage} about {human_size(e.peak_bytes)}" for e in estimates)
        + (" (reference in bfloat16 to fit)" if fitted.reference_dtype != quality.reference_dtype else "")
    )
    return fitted


def preflight(
    options: ExportingOptions,
    base_dir: Path,
    adapters: list[LoraAdapter],
    profiles: list[QuantProfile],
    vendored: VendoredLlamaCpp,
    report: Callable[[str], None],
    dtype: str | None = None,
    writes_merged: bool = True,
    keeps_merged: bool = True,
) -> QualityOptions:
    """Every check of a command that writes GGUFs, before any work: the inputs, the disk plan (with the
    merged model when the command writes one, in `dtype`, kept or released once converted), the memory
    budget; returns the quality
    options to use (the reference may move to bfloat16 to fit --max-memory)."""
    from exporter.core.paths import cache_root

    trust = options.inputs.trust_remote_code
    for note in check_inputs(base_dir, adapters, vendored, trust, options.quality.eval_data, options.check):
        report(f"note: {note}")
    requested = DTYPE_ALIASES.get((dtype or "").lower())
    out = options.output.out
    kept = "kept" if keeps_merged else "released"
    cache = cache_root() if options.run.use_cache else out
    plan = plan_disk(base_dir, profiles, out, cache, requested, kept if writes_merged else "none")
    check_disk(plan, options.run.max_disk)
    f16 = next(item.bytes for item in plan.items if item.what == f"{plan.source} GGUF")
    quality = replace(options.quality, trust_remote_code=trust)
    merged = _merged_bytes(requested) if writes_merged else None
    return fit_budget(
        options.run.max_memory, base_dir, adapters, quality, merged, f16 if options.check else None, report
    )
