"""mlx-lm adapters (`mlx_lm.lora`): adapters.safetensors and adapter_config.json, read as the PEFT LoRA they are.

mlx-lm 0.32 saves the trainable parameters under the model's own module names, in float32:
`<module>.lora_a` (in, r) and `<module>.lora_b` (r, out) for a Linear, (vocab, r) and (r, dim) for an
Embedding, and DoRA's magnitude `<module>.m` (out,). Its config (the training arguments) gives
`fine_tune_type` (lora, dora or full), `lora_parameters` {rank, scale, dropout, keys} and `num_layers`
(the last N blocks; which modules were adapted is read from the file). The forward passes are PEFT's with
PEFT's scaling lora_alpha / r equal to mlx's `scale`:

- LoRA Linear: y = x Wᵀ + scale · (x A) B, so PEFT's lora_A = Aᵀ (r, in) and lora_B = Bᵀ (out, r);
- DoRA Linear: y = m / ‖W + scale (A B)ᵀ‖_row · (x Wᵀ + scale (x A) B) + bias, the norm per output row and
  detached, which is PEFT's DoRA with lora_magnitude_vector = m;
- LoRA Embedding: E[x] + scale · A[x] B, PEFT's lora_embedding_A = Aᵀ and lora_embedding_B = Bᵀ.

The translation is exact (a transposition) and is written once, content-addressed, under the cache
(`<cache>/inputs/mlx-<sha256>`); every stage then reads it as any PEFT adapter, and the manifest names the
mlx folder. What the translation cannot carry is refused by name: full fine-tunes, LoRA on MoE experts
(mlx's SwitchLinear), DoRA on an embedding, adapters trained on a quantized mlx model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.core.jsonfile import read_json_object
from exporter.inputs.dialects import read_rope
from exporter.inputs.safetensors_header import read_header

MLX_WEIGHTS = "adapters.safetensors"
_PARTS = {"lora_a", "lora_b", "m"}
# The module names mlx-lm gives embeddings (an Embedding's LoRA has other shapes than a Linear's).
_EMBEDDINGS = ("embed_tokens", "wte", "embed_in", "tok_embeddings")
# mlx-lm 0.32's model classes that read transformers 5's rope_parameters; the others read only a
# top-level rope_theta and otherwise use their default (10000 for Llama's).
_READS_ROPE_PARAMETERS = frozenset(
    {"exaone_moe", "gemma4_text", "granitemoehybrid", "lfm2", "lfm2_moe", "ministral3", "qwen3", "qwen3_5"}
)


def is_mlx_adapter(folder: Path) -> bool:
    return (folder / MLX_WEIGHTS).is_file() and not (folder / "adapter_model.safetensors").is_file()


def translate(folder: Path, cache: Path) -> Path:
    """The PEFT adapter folder equal to the mlx-lm adapter in `folder` (written once under `cache`)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(
            f"{folder} holds {MLX_WEIGHTS} but no adapter_config.json, so what the weights mean (rank, scale, "
            "LoRA or DoRA) is unknown. Pass the folder mlx_lm.lora wrote (--adapter-path), which holds both."
        )
    config = read_json_object(config_file, "re-save the adapter with mlx_lm.lora.")
    weights = folder / MLX_WEIGHTS
    digest = hashlib.sha256(config_file.read_bytes() + weights.read_bytes()).hexdigest()
    target = cache / "inputs" / f"mlx-{digest[:32]}"
    if (target / "adapter_model.safetensors").is_file():
        return target
    peft_config, tensors = _plan(folder, config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write(weights, tensors, peft_config, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process translated the same adapter first
            if not (target / "adapter_model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _plan(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """PEFT's adapter_config.json and, per PEFT tensor name, the mlx tensor and how to take it."""
    config_file = folder / "adapter_config.json"
    kind = str(config.get("fine_tune_type", "lora"))
    if kind not in ("lora", "dora"):
        raise InputError(
            f"{config_file} says fine_tune_type {kind!r}: {folder / MLX_WEIGHTS} holds whole trained layers, "
            "not an adapter. Export a LoRA or DoRA fine-tune (mlx_lm.lora --fine-tune-type lora|dora), or save "
            "the full fine-tune as a model folder (mlx_lm fuse --dequantize): a whole model, not an adapter to merge."
        )
    params = config.get("lora_parameters") or {}
    rank, scale = params.get("rank"), params.get("scale")
    if (
        not isinstance(rank, int)
        or rank <= 0
        or not isinstance(scale, int | float)
        or isinstance(scale, bool)
    ):
        raise InputError(
            f"{config_file}: lora_parameters needs a positive integer rank and a numeric scale (mlx-lm's "
            f"multiplier of the low-rank update), not rank={rank!r}, scale={scale!r}. Re-save it with mlx_lm.lora."
        )
    _refuse_quantized_training(folder, config)
    header = read_header(folder / MLX_WEIGHTS)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for entry in header:
        name = entry.name
        module, _, part = name.rpartition(".")
        if part not in _PARTS or not module:
            raise InputError(
                f"{folder / MLX_WEIGHTS} holds {name!r}, which is not an mlx-lm LoRA or DoRA parameter (lora_a, "
                "lora_b, m); it is not an adapter mlx_lm.lora saved."
            )
        modules.setdefault(module, {})[part] = tuple(entry.shape)
    tensors: dict[str, tuple[str, str]] = {}
    for module, parts in sorted(modules.items()):
        tensors.update(_module_tensors(folder, module, parts, rank, kind == "dora"))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.get("model"),
        "r": rank,
        "lora_alpha": float(scale) * rank,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": kind == "dora",
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    return peft_config, tensors


def _module_tensors(
    folder: Path, module: str, parts: dict[str, tuple[int, ...]], rank: int, dora: bool
) -> dict[str, tuple[str, str]]:
    weights = folder / MLX_WEIGHTS
    a, b = parts.get("lora_a"), parts.get("lora_b")
    if a is None or b is None:
        raise InputError(f"{weights}: {module} has {sorted(parts)} but needs both lora_a and lora_b.")
    if len(a) != 2 or len(b) != 2:
        raise InputError(
            f"{weights}: {module} is an mlx-lm LoRA on stacked MoE experts (SwitchLinear, lora_a {a}); "
            "edge-export does not translate those yet. Train the adapter on the attention and dense layers "
            "(lora_parameters.keys), or fuse it with mlx_lm fuse --dequantize and convert the fused model."
        )
    if a[1] != rank or b[0] != rank:
        raise InputError(
            f"{weights}: {module}'s lora_a {a} and lora_b {b} do not have the rank {rank} that "
            f"{folder / 'adapter_config.json'} gives (lora_parameters.rank); the config and weights do not belong together."
        )
    prefix = f"base_model.model.{module}"
    embedding = module.rsplit(".", 1)[-1] in _EMBEDDINGS
    if embedding and dora:
        raise InputError(
            f"{weights}: {module} is an embedding trained with DoRA, whose per-row norm PEFT computes "
            "differently from mlx-lm; edge-export refuses it rather than export another model. Train DoRA on "
            "the linear layers only (lora_parameters.keys)."
        )
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    tensors = {
        f"{prefix}.{names[0]}": (f"{module}.lora_a", "T"),
        f"{prefix}.{names[1]}": (f"{module}.lora_b", "T"),
    }
    if dora:
        if "m" not in parts:
            raise InputError(f"{weights}: {module} is a DoRA module without its magnitude {module}.m.")
        tensors[f"{prefix}.lora_magnitude_vector"] = (f"{module}.m", "")
    return tensors


def _refuse_quantized_training(folder: Path, config: dict[str, Any]) -> None:
    """An adapter trained on a quantized mlx model belongs to its dequantized weights, not the 16-bit base."""
    model = config.get("model")
    model_config = Path(str(model)) / "config.json" if model else None
    if model_config is None or not model_config.is_file():
        return
    try:
        data = json.loads(model_config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # not a model config this check can read; the export reads --base's own
    quantization = (
        data.get("quantization") or data.get("quantization_config") if isinstance(data, dict) else None
    )
    if isinstance(quantization, dict) and "bits" in quantization:
        raise InputError(
            f"{folder} was trained on {model}, an mlx model quantized to {quantization.get('bits')} bits "
            f"({model_config}): its updates belong to the quantized weights, not to the 16-bit base. Export it "
            f"with the dequantized model as --base (mlx_lm convert --hf-path {model} --dequantize --mlx-path <dir>)."
        )


def _write(
    weights: Path, tensors: dict[str, tuple[str, str]], peft_config: dict[str, Any], out: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    values = {}
    with safe_open(str(weights), "pt") as handle:
        for name, (source, how) in tensors.items():
            tensor = handle.get_tensor(source)
            values[name] = tensor.T.contiguous() if how == "T" else tensor.contiguous()
    save_file(values, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")


def rope_note(folder: Path, base_config: dict[str, Any]) -> str | None:
    """mlx-lm 0.32 reads only a top-level rope_theta for most architectures: a base saved by transformers 5
    (rope_parameters) trains with the class default (10000) there. Say so when it differs from the base's."""
    config = read_json_object(folder / "adapter_config.json", "re-save the adapter with mlx_lm.lora.")
    trained = Path(str(config.get("model"))) / "config.json" if config.get("model") else None
    seen = base_config
    if trained is not None and trained.is_file():
        try:
            loaded = json.loads(trained.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            loaded = None
        seen = loaded if isinstance(loaded, dict) else base_config
    if "rope_theta" in seen or str(seen.get("model_type")) in _READS_ROPE_PARAMETERS:
        return None
    theta = read_rope(base_config).theta
    if theta is None or float(theta) == 10000.0:
        return None
    return (
        f"{folder} is an mlx-lm adapter, and mlx-lm 0.32's {seen.get('model_type')} reads rope_theta, which the "
        f"base's config.json (transformers 5: rope_parameters) does not have: unless training patched it, the "
        f"adapter was trained with rope_theta 10000, while the export (and llama.cpp) uses {theta}. Train with "
        "a top-level rope_theta in the config mlx-lm loads."
    )
