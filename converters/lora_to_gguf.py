"""Convert a PEFT LoRA adapter to a GGUF LoRA with the vendored convert_lora_to_gguf.py, scaled right.

llama.cpp applies a GGUF LoRA as W·x + s·B(A·x) with s = user_scale · alpha / rank, one global
`adapter.lora.alpha` and the rank read from each tensor's shape. PEFT's scale is alpha/r, or
alpha/√r with `use_rslora`, with per-module alpha from `alpha_pattern`; the converter writes only
the global alpha, so rsLoRA and alpha_pattern adapters come out mis-scaled. We fold the missing
factor, PEFT's scale ÷ llama.cpp's scale, into each module's lora_B before converting, so the
runtime computes exactly PEFT's update (for a plain LoRA the factor is 1 and nothing changes).

The converter runs as a subprocess with the vendored gguf-py first on its path and never the
network; a second subprocess adds the base's identity to the adapter's metadata (so a tool can
refuse to pair it with another base):

    edge_export.base.architecture   general.architecture of the base
    edge_export.base.uuid           general.uuid written into the base GGUF (and kept by quantizing)
    edge_export.base.gguf_sha256    sha256 of the unquantized (F16) base GGUF it was made for
    edge_export.base.shapes_sha256  sha256 of the base GGUF's tensor names and shapes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from converters.child import die_with_parent, stderr_tail
from converters.errors import StageError
from converters.hf_to_gguf import converter_env
from converters.vendor import VendoredLlamaCpp

KEY_PREFIX = "edge_export."
BASE_KEYS = ("architecture", "uuid", "gguf_sha256", "shapes_sha256")
SCALE_NOTE_KEY = "edge_export.adapter.scale_correction"


def write_corrected_adapter(
    adapter_dir: Path,
    config: dict[str, Any],
    weights: Path,
    factors: Mapping[str, float],
    target: Path,
    expanded: Mapping[str, tuple[Any, Any]] | None = None,
    dropped: Collection[str] = (),
) -> None:
    """A copy of the adapter at `target` whose lora_B of each module in `factors` is multiplied by it.

    `factors` maps module names (without PEFT's `base_model.model.` prefix) to the correction; the
    copied config drops use_rslora and alpha_pattern, which the corrected tensors now carry.
    `expanded` adds modules as (lora_A, lora_B) under their stored names, in place of the modules in
    `dropped` (fused mixture-of-experts LoRA, written per expert as the converter reads it).
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = (
        load_file(str(weights))
        if weights.suffix == ".safetensors"
        else torch.load(weights, weights_only=True)
    )
    corrected = {}
    for module_name, (lora_a, lora_b) in (expanded or {}).items():
        tensors[f"base_model.model.{module_name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module_name}.lora_B.weight"] = lora_b
    for name, tensor in tensors.items():
        module = name.removeprefix("base_model.model.")
        if module.split(".lora_", 1)[0] in dropped:
            continue
        for marker in (".lora_B.", ".lora_embedding_B"):
            if marker in module:
                factor = factors.get(module.split(marker, 1)[0], 1.0)
                if factor != 1.0:
                    tensor = (tensor.float() * factor).to(torch.float32)
        corrected[name] = tensor.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(corrected, str(target / "adapter_model.safetensors"))
    clean = {k: v for k, v in config.items() if k not in ("use_rslora", "alpha_pattern", "target_parameters")}
    (target / "adapter_config.json").write_text(json.dumps(clean, indent=2))
    if (adapter_dir / "README.md").is_file():  # the converter reads the model card for metadata
        (target / "README.md").write_bytes((adapter_dir / "README.md").read_bytes())


def convert_lora_to_gguf(
    adapter_dir: Path,
    config: dict[str, Any],
    weights: Path,
    base_dir: Path,
    target: Path,
    vendored: VendoredLlamaCpp,
    factors: Mapping[str, float],
    metadata: Mapping[str, str],
    outtype: str = "f16",
    expanded: Mapping[str, tuple[Any, Any]] | None = None,
    dropped: Collection[str] = (),
) -> None:
    """Write `target`, the GGUF LoRA of the adapter (scale-corrected, with `metadata` added).

    `target` appears only when complete; `metadata` keys are GGUF string keys.
    """
    with tempfile.TemporaryDirectory(prefix="edge-export-lora-", dir=target.parent) as scratch:
        corrected = Path(scratch) / "adapter"
        write_corrected_adapter(adapter_dir, config, weights, factors, corrected, expanded, dropped)
        converted = Path(scratch) / "converted.gguf"
        command = [
            sys.executable,
            str(vendored.convert_lora_script),
            str(corrected),
            "--base",
            str(base_dir),
            "--outtype",
            outtype,
            "--outfile",
            str(converted),
        ]
        _run(command, vendored, f"convert_lora_to_gguf.py on {adapter_dir}")
        partial = Path(scratch) / "with-metadata.gguf"
        request = Path(scratch) / "metadata.json"
        request.write_text(json.dumps(dict(metadata)))
        module_command = [
            sys.executable,
            "-m",
            "converters.gguf_metadata",
            str(converted),
            str(partial),
            str(request),
        ]
        _run(module_command, vendored, f"adding base identity to the GGUF LoRA of {adapter_dir}")
        os.replace(partial, target)


def _run(command: list[str], vendored: VendoredLlamaCpp, what: str) -> None:
    env = converter_env(vendored)
    # The metadata step imports this package; make it importable wherever edge-export is installed.
    project = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], project])
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, errors="replace", preexec_fn=die_with_parent
    )
    if proc.returncode != 0:
        revision = f"llama.cpp {vendored.commit[:9]} (llama-cpp-python {vendored.llama_cpp_python})"
        raise StageError(
            f"{what} ({revision}) failed with exit code {proc.returncode}:\n{stderr_tail(proc.stderr)}"
        )
