"""Importance matrices computed from the user's own data, on the merged model.

For every linear layer that llama.cpp quantizes, the importance of an input column is the mean of
the squared activations that reach it (what llama.cpp's llama-imatrix collects). Activations are
collected with PyTorch forward hooks on the merged Hugging Face model while it reads the
calibration text, then written as a llama.cpp imatrix GGUF (`<tensor>.in_sum2`, `<tensor>.counts`)
under the GGUF tensor names. The HF -> GGUF name mapping is done by the vendored gguf-py (the same
table convert_hf_to_gguf.py uses) and checked against the F16 GGUF's tensors and widths, so a
matrix can never be attached to the wrong tensor.

Like llama-imatrix by default, the output projection (lm_head) is not collected; the token
embedding is a lookup, not a matrix product, and has no activations to collect.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.gguf_header import read_gguf_metadata
from converters.imatrix_gguf import write_imatrix_gguf
from converters.vendor import VendoredLlamaCpp
from exporter.core.errors import InputError, StageError
from exporter.inputs.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CHUNK = 512  # tokens per calibration sequence (llama-imatrix's default context)
DEFAULT_MAX_TOKENS = 65536
MIN_TOKENS = 256


@dataclass(frozen=True)
class ImatrixResult:
    """What was collected: entries written, calibration tokens and sequences, and what was skipped."""

    entries: int
    tokens: int
    chunks: int
    skipped: tuple[str, ...]
    seconds: float
    dtype: str  # of the forward pass whose activations were collected

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "skipped": list(self.skipped),
            "seconds": round(self.seconds, 3),
            "dtype": self.dtype,
        }


def calibration_sequences(path: Path, tokenizer: Any, max_tokens: int) -> list[tuple[int, ...]]:
    """The calibration file as token sequences of at most CHUNK tokens (text windows or chat renders)."""
    from exporter.inputs.evaldata import load_eval_data

    data = load_eval_data(
        path, tokenizer, window=CHUNK, n_prompts=0, label=("calibration data", "--calibration")
    )
    sequences: list[tuple[int, ...]] = []
    total = 0
    for sequence in data.sequences:
        if total >= max_tokens:
            break
        sequence = sequence[: max_tokens - total]
        sequences.append(sequence)
        total += len(sequence)
    if total < MIN_TOKENS:
        raise InputError(
            f"The calibration data {path} gives only {total} tokens; an importance matrix needs at least "
            f"{MIN_TOKENS} (thousands are better). Give --calibration more text from the model's domain."
        )
    return sequences


def activation_dtype(model_dir: Path) -> str:
    """float32 when the model fits comfortably in the machine's memory that way, else bfloat16.

    Decided from the installed memory, not the memory free at the moment: the activations, and so
    the matrix and every GGUF quantized with it, must not change from one run to the next."""
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))  # 16-bit on disk
    try:
        installed = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        installed = 0
    return "float32" if installed == 0 or weights * 2 < installed // 2 else "bfloat16"


def collect_activations(
    model_dir: Path, sequences: list[tuple[int, ...]], threads: int | None = None, dtype: str = "float32"
) -> dict[str, tuple[Any, int]]:
    """Per linear layer of the merged model: (sum of squared inputs per column, tokens seen)."""
    import torch
    from transformers import AutoModelForCausalLM

    from exporter.inputs.dialects import quiet_transformers

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, dtype), local_files_only=True
    )
    model.eval()
    output = model.get_output_embeddings()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def collect(_module: Any, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            squared = (x * x).sum(dim=0)
            if name in sums:
                sums[name] += squared
            else:
                sums[name] = squared
            counts[name] = counts.get(name, 0) + x.shape[0]

        return collect

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.inference_mode():
            for sequence in sequences:
                model(torch.tensor([sequence]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name].numpy(), counts[name]) for name in sums}


def compute_imatrix(
    model_dir: Path,
    f16_gguf: Path,
    calibration: Path,
    target: Path,
    vendored: VendoredLlamaCpp,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    threads: int | None = None,
    dtype: str | None = None,
) -> ImatrixResult:
    """Compute the importance matrix of the merged model in `model_dir` and write it to `target`;
    the forward pass runs in `dtype` (default: activation_dtype's choice for this machine)."""
    import numpy as np

    start = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    sequences = calibration_sequences(calibration, tokenizer, max_tokens)
    dtype = dtype or activation_dtype(model_dir)
    stats = collect_activations(model_dir, sequences, threads, dtype)
    with tempfile.TemporaryDirectory(prefix="edge-export-imatrix-") as scratch:
        arrays = Path(scratch) / "stats.npz"
        np.savez(
            arrays, **{f"{name}.weight": values.astype(np.float32) for name, (values, _) in stats.items()}
        )
        request = {
            "stats": str(arrays),
            "counts": {f"{name}.weight": count for name, (_, count) in stats.items()},
            "f16_gguf": str(f16_gguf),
            "target": str(target),
            "dataset": calibration.name,
            "chunks": len(sequences),
            "chunk_size": CHUNK,
        }
        response = write_imatrix_gguf(request, vendored)
    skipped = tuple(response["skipped"])
    if skipped:
        log.warning(
            "no GGUF tensor for %d collected layer(s) (%s); they are quantized without importance data",
            len(skipped),
            ", ".join(skipped[:5]),
        )
    if response["entries"] == 0:
        raise StageError(
            f"None of the {len(stats)} layers collected from {model_dir} maps to a tensor of {f16_gguf}; "
            "the importance matrix would be empty. Quantize without --calibration for this architecture."
        )
    return ImatrixResult(
        response["entries"],
        sum(len(s) for s in sequences),
        len(sequences),
        skipped,
        time.perf_counter() - start,
        dtype,
    )


@dataclass(frozen=True)
class ImatrixStage:
    """The importance matrix of one export: where it is cached and published, and its provenance."""

    key: str
    cached: Path
    output: Path
    sha256: str
    calibration: Path  # the calibration data, or with `given` the matrix file passed to --imatrix
    calibration_sha256: str
    result: dict[str, Any]
    reused: bool
    given: bool = False

    @property
    def dataset(self) -> str:
        return str(self.result.get("dataset") or self.calibration.name)

    def gguf_metadata(self) -> dict[str, str | int]:
        """Provenance keys for every GGUF quantized with it (llama-quantize's own keys, plus hashes)."""
        keys: dict[str, str | int] = {
            "quantize.imatrix.file": self.output.name,
            "quantize.imatrix.dataset": self.dataset,
            "quantize.imatrix.entries_count": int(self.result["entries"]),
            "quantize.imatrix.chunks_count": int(self.result["chunks"]),
            "edge_export.imatrix.sha256": self.sha256,
        }
        if not self.given:
            keys["edge_export.imatrix.calibration_sha256"] = self.calibration_sha256
            keys["edge_export.imatrix.tokens"] = int(self.result["tokens"])
        return keys

    def to_json(self, root: Path) -> dict[str, Any]:
        source: dict[str, Any] = (
            {"given": str(self.calibration)}
            if self.given
            else {"calibration": {"path": str(self.calibration), "sha256": self.calibration_sha256}}
        )
        return {
            "path": self.output.relative_to(root).as_posix(),
            "sha256": self.sha256,
            **source,
            **self.result,
        }


def read_imatrix_file(path: Path, f16_gguf: Path) -> dict[str, Any]:
    """Check an importance-matrix GGUF passed to --imatrix against the F16 GGUF it will quantize:
    every entry must name a weight of that GGUF, have one value per input column (per expert), a
    count, and only finite, non-negative values. Returns what the manifest records of it."""
    import numpy as np
    from gguf import GGUFReader

    fix = (
        "Pass the <name>.imatrix.gguf of an earlier edge-export run on this model, or llama-imatrix's "
        "GGUF output for it, or let edge-export compute one with --calibration FILE instead."
    )
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means "not a GGUF we can read"
        raise InputError(
            f"The importance matrix {path} (--imatrix) is not a readable GGUF file ({exc}). llama-imatrix's "
            f"older .dat format is not read: write the matrix as GGUF (llama-imatrix -o {path.stem}.gguf). {fix}"
        ) from exc
    field = reader.fields.get("general.type")
    kind = field.contents() if field is not None else None
    if kind != "imatrix":
        raise InputError(
            f"{path} (--imatrix) is a GGUF of type {kind!r}, not an importance matrix (general.type = "
            f"imatrix). {fix}"
        )
    _, weights = read_gguf_metadata(f16_gguf, ())
    tensors = {t.name: t for t in reader.tensors}
    entries, problems = 0, []
    for name, tensor in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name.removesuffix(".in_sum2")
        shape = weights.get(weight)
        sums = np.asarray(tensor.data, dtype=np.float32)
        counts_tensor = tensors.get(f"{weight}.counts")
        counts = np.asarray(counts_tensor.data) if counts_tensor is not None else None
        experts = shape[2] if shape is not None and len(shape) > 2 else 1
        if shape is None:
            problems.append(f"{weight} is not a tensor of {f16_gguf.name}")
        elif sums.size != shape[0] * experts:
            problems.append(f"{weight} has {sums.size} values for {shape[0] * experts} input columns")
        elif counts is None or counts.size != experts:
            problems.append(f"{weight} has no counts, or not one per expert")
        elif not (np.isfinite(sums).all() and (sums >= 0).all() and (counts >= 0).all()):
            problems.append(f"{weight} has NaN, infinite or negative values")
        else:
            entries += 1
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InputError(
            f"The importance matrix {path} (--imatrix) does not fit this model's {f16_gguf.name}: {listed}. "
            f"It was computed for another model or is damaged. {fix}"
        )
    if entries == 0:
        raise InputError(f"The importance matrix {path} (--imatrix) holds no entries. {fix}")

    def scalar(key: str) -> int:
        found = reader.fields.get(key)
        return int(found.contents()) if found is not None else 0

    datasets = reader.fields.get("imatrix.datasets")
    names = datasets.contents() if datasets is not None else []
    chunks, chunk_size = scalar("imatrix.chunk_count"), scalar("imatrix.chunk_size")
    return {
        "entries": entries,
        "chunks": chunks,
        "tokens": chunks * chunk_size,
        "dataset": ", ".join(str(n) for n in names) if names else path.name,
        "skipped": [],
        "seconds": 0.0,
        "dtype": None,
    }
