"""Merge PEFT adapters into a 16-bit base, tensor by tensor, without loading the whole model.

For every base tensor an adapter touches, the updates are applied in fp32 in the order the adapters
were given, and the result is cast to the output dtype:

- LoRA (Linear, Conv1D with fan_in_fan_out, Embedding): W + w·s·B·A, with PEFT's scaling s
  (alpha/r, alpha/√r for rsLoRA, rank_pattern and alpha_pattern);
- DoRA: m / ‖W + ΔW‖_row · (W + ΔW), the norm taken per output row as PEFT computes it;
- trained LoRA biases (lora_bias): b + w·s·b_B;
- IA3: W ⊙ l (and the bias of non-feedforward layers);
- modules_to_save and trained biases (bias="all"/"lora_only"): the adapter's full tensor.

Tensors are read with plain file reads and written into shards whose headers are planned up
front (exporter.safetensors_io), so the working set is a few copies of the largest tensor,
whatever the model's size. Everything is checked before any output is written, every merged
tensor must be finite, and the output folder appears only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.adapter import ADAPTER_CONFIG, LICENSE_PATTERN, LoraAdapter, tokenizer_source
from exporter.artifacts import MergeResult
from exporter.dialects import (
    CHAT_TEMPLATE_FILES,
    classify_full_key,
    portable_config,
    portable_tokenizer_config,
    read_chat_template,
)
from exporter.errors import InputError
from exporter.safetensors_header import (
    DEFAULT_SHARD_BYTES,
    DTYPE_ALIASES,
    DtypeChoice,
    base_shard_files,
    choose_merge_dtype,
)
from exporter.safetensors_io import DTYPES as SAFETENSORS_DTYPES
from exporter.safetensors_io import (
    PlannedTensor,
    StreamingShardWriter,
    TensorEntry,
    iter_tensors,
    read_header,
)

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
DTYPES = {alias: SAFETENSORS_DTYPES[name] for alias, name in DTYPE_ALIASES.items()}
# Files copied from the base (or the adapter, for tokenizer files) into the merged folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PASSTHROUGH_FILES = ("generation_config.json",)
PROVENANCE_FILE = "edge-export-merge.json"
EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
)
OUTPUT_NAME = "lm_head.weight"
QUANTIZED_BASE_HINT = re.compile(r"bnb|4bit|4-bit|nf4|gptq|awq|int4|8bit", re.IGNORECASE)
MERGEABLE_TYPES = ("LORA", "IA3")
# Tensors some LoRA variants save that act only while training (PEFT merges plain B·A for them).
TRAINING_ONLY_TENSORS = {
    "monteclora_config": ".lora_monteclora_sampler.",  # MonteCLoRA's variational sampler
    "velora_config": ".lora_velora_",  # VeLoRA's activation-compression projection
}
UNMERGEABLE_TYPES = {
    "PREFIX_TUNING": "prefix tuning adds learned key/value prefixes at run time",
    "PROMPT_TUNING": "prompt tuning adds learned virtual tokens at run time",
    "P_TUNING": "p-tuning adds learned virtual tokens at run time",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning adds learned virtual tokens at run time",
    "ADAPTION_PROMPT": "adaption prompts add gated attention prefixes at run time",
}


# ---------------------------------------------------------------------------------------------- updates


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's low-rank update of one weight (optionally DoRA)."""

    lora_a: torch.Tensor  # r × in   (for embeddings: r × num_embeddings)
    lora_b: torch.Tensor  # out × r  (for embeddings: dim × r)
    scale: float  # adapter weight · PEFT scaling
    fan_in_fan_out: bool = False
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    def delta(self) -> torch.Tensor:
        """ΔW in the orientation the weight is stored in."""
        product = self.lora_b.float() @ self.lora_a.float()
        if self.fan_in_fan_out or self.embedding:
            product = product.T
        return product * self.scale

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW; `weight` is a float32 working copy, updated in place when there is no DoRA."""
        if self.magnitude is None:  # one fused multiply-add: no ΔW-sized temporaries
            a, b = self.lora_a.float(), self.lora_b.float()
            if self.fan_in_fan_out or self.embedding:
                return weight.addmm_(a.T, b.T, alpha=self.scale)
            return weight.addmm_(b, a, alpha=self.scale)
        delta = self.delta()
        # DoRA: rescale each output row of W + ΔW to the learned magnitude (PEFT's get_weight_norm).
        combined = weight + delta
        rows = combined.T if self.fan_in_fan_out else combined
        factor = self.magnitude.float() / torch.linalg.norm(rows, dim=1)
        return combined * (factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1))


@dataclass(frozen=True)
class KasaUpdate:
    """KaSA (PEFT 0.21 `kasa_config`): W → SVD_{k−r}(W) + s·B·diag(d)·A.

    PEFT truncates the frozen base weight when the adapter is created, dropping its r smallest singular
    components (k = min(out, in)), and trains the update with a learned diagonal between A and B
    (peft/tuners/lora/variants.py, KasaLinearVariant). The truncation is recomputed here from the base,
    in float32 as PEFT does.
    """

    lora_a: torch.Tensor  # r × in
    lora_b: torch.Tensor  # out × r
    diag: torch.Tensor  # r
    scale: float
    rank: int

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        keep = min(weight.shape) - self.rank
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        truncated = (u[:, :keep] * s[:keep]) @ vh[:keep]
        b = self.lora_b.float() * self.diag.float()
        return truncated.addmm_(b, self.lora_a.float(), alpha=self.scale)


@dataclass(frozen=True)
class AddUpdate:
    """A trained LoRA bias (lora_B.bias), added with the adapter's scaling."""

    vector: torch.Tensor
    scale: float

    def apply(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.vector.float() * self.scale


@dataclass(frozen=True)
class ScaleUpdate:
    """IA3: an elementwise rescaling vector, broadcast over the stored weight (or a bias)."""

    vector: torch.Tensor  # (out, 1) or (1, in) in the weight's stored orientation; 1-D for a bias

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor * self.vector.float()


@dataclass(frozen=True)
class Replacement:
    """A full tensor the adapter trained (modules_to_save, bias="all"/"lora_only")."""

    tensor: torch.Tensor

    def apply(self, _: torch.Tensor) -> torch.Tensor:
        return self.tensor.float()


Update = LoraUpdate | KasaUpdate | AddUpdate | ScaleUpdate | Replacement


@dataclass
class MergePlan:
    """What happens to each output tensor, decided and checked before anything is written."""

    updates: dict[str, list[Update]] = field(default_factory=dict)
    # Output tensors that do not exist in the base, as (name, base tensor they start from).
    extra_outputs: list[tuple[str, str]] = field(default_factory=list)
    config_changes: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, update: Update) -> None:
        self.updates.setdefault(name, []).append(update)


# ----------------------------------------------------------------------------------------- adapter side


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_scale(config: dict[str, Any], module_name: str) -> tuple[int, float]:
    """(rank, scaling) for one module exactly as PEFT computes it."""
    rank = int(pattern_value(config.get("rank_pattern") or {}, module_name, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        return rank, alpha / math.sqrt(rank)
    return rank, alpha / rank


def load_adapter_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    if adapter.weights.suffix == ".safetensors":
        entries = read_header(adapter.weights)
        return {entry.name: tensor.clone() for entry, tensor in iter_tensors(entries)}
    # Only reached with --allow-pickle; weights_only refuses arbitrary objects.
    try:
        return torch.load(adapter.weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{adapter.weights} could not be loaded with weights_only=True ({exc}).") from exc


def _matches_module(module: str, names: list[str] | str | None) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith(f".{n}") for n in names)


def check_adapter_type(adapter: LoraAdapter) -> None:
    where = adapter.path / ADAPTER_CONFIG
    peft_type = adapter.peft_type
    if peft_type in UNMERGEABLE_TYPES:
        raise InputError(
            f"{where} is a {peft_type} adapter, and {UNMERGEABLE_TYPES[peft_type]}: it cannot be merged into "
            "weights, so it cannot become a standalone GGUF. Train a LoRA (or IA3) adapter to export it."
        )
    if peft_type not in MERGEABLE_TYPES:
        raise InputError(
            f"{where} is a {peft_type} adapter; edge-export merges {' and '.join(MERGEABLE_TYPES)} adapters. "
            "Merge it with PEFT's merge_and_unload and pass the result as a base with no adapter changes, "
            "or train a LoRA adapter."
        )
    if adapter.config.get("trainable_token_indices"):
        raise InputError(
            f"{where} trains individual token embeddings (trainable_token_indices), which this merge does not "
            "handle. Merge with PEFT's merge_and_unload, or retrain with modules_to_save for the embeddings."
        )


def plan_adapter(
    adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]], plan: MergePlan, conv1d: bool = False
) -> None:
    """Add one adapter's updates to the plan, checking names, shapes and features against the base."""
    check_adapter_type(adapter)
    tensors = load_adapter_tensors(adapter)
    if not tensors:
        raise InputError(f"{adapter.weights} holds no tensors; the adapter is empty.")
    names = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}
    if adapter.peft_type == "IA3":
        _plan_ia3(adapter, names, base_shapes, plan)
    else:
        _plan_lora(adapter, names, base_shapes, plan, conv1d)


def _shape_error(adapter: LoraAdapter, what: str, target: str, base_shape: tuple[int, ...]) -> InputError:
    return InputError(
        f"{adapter.weights}: {what}, which does not fit the base tensor {target} {base_shape}: the adapter was "
        "trained for a different base (or its config's r / rank_pattern is wrong). Pass the matching --base."
    )


def _require_target(
    adapter: LoraAdapter, target: str, base_shapes: dict[str, tuple[int, ...]]
) -> tuple[int, ...]:
    if target not in base_shapes:
        raise InputError(
            f"{adapter.weights} changes {target}, which the base model does not have: the adapter was trained "
            "for a different base. Pass the matching --base."
        )
    return base_shapes[target]


def _plan_lora(
    adapter: LoraAdapter,
    names: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
    conv1d: bool,
) -> None:
    config = adapter.config
    use_dora = bool(config.get("use_dora"))
    kasa = config.get("kasa_config") is not None
    bias_mode = config.get("bias", "none")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    part_pattern = re.compile(
        r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|lora_diag)"
        r"(?:\.default)?(?:\.(weight|bias))?$"
    )
    trained_copies: set[str] = set()
    for name, tensor in names.items():
        match = part_pattern.match(name)
        if match:
            part = match.group(2) + (".bias" if match.group(3) == "bias" else "")
            modules.setdefault(match.group(1), {})[part] = tensor
            continue
        if any(config.get(key) and marker in name for key, marker in TRAINING_ONLY_TENSORS.items()):
            continue
        key = classify_full_key(name)
        if key.kind == "original copy":
            continue  # the base's own weights, saved beside the trained copy by some PEFT versions
        if key.kind == "trained copy":
            trained_copies.add(key.name)
        elif key.name in trained_copies:
            continue  # a plain copy beside the trained one: the trained copy is what PEFT loads
        full[key.name] = tensor

    # Full tensors first: a saved base-layer weight is what that module's LoRA delta is added to.
    for name, tensor in sorted(full.items()):
        module = name.rsplit(".", 1)[0]
        is_saved_module = _matches_module(module, config.get("modules_to_save"))
        is_trained_bias = name.endswith(".bias") and bias_mode in ("all", "lora_only")
        # With embedding layers among the targets PEFT also saves their base weights, which it loads
        # over the base's; they are the weights the LoRA was trained on top of.
        is_saved_base_layer = name.endswith(".weight") and module in modules
        if not (is_saved_module or is_trained_bias or is_saved_base_layer):
            raise InputError(
                f"{adapter.weights} holds tensor {name!r}, which is neither a LoRA matrix nor listed in "
                "modules_to_save; edge-export does not know how to merge it."
            )
        if adapter.weight != 1.0:
            raise InputError(
                f"{adapter.path} replaces {name} outright (modules_to_save or a trained bias), so it cannot be given "
                f"a weight ({adapter.weight}). Merge it with weight 1."
            )
        shape = _require_target(adapter, name, base_shapes)
        if tuple(tensor.shape) != shape:
            hint = (
                " (the adapter resized the vocabulary; merging added tokens is not supported yet)"
                if (name == OUTPUT_NAME or name in EMBEDDING_NAMES)
                else ""
            )
            raise _shape_error(adapter, f"{name} is {tuple(tensor.shape)}{hint}", name, shape)
        plan.add(name, Replacement(tensor))

    for module, parts in sorted(modules.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_key not in parts or b_key not in parts:
            raise InputError(
                f"{adapter.weights}: module {module} lacks {a_key} or {b_key}; the adapter is incomplete."
            )
        target = f"{module}.weight"
        shape = _require_target(adapter, target, base_shapes)
        rank, scale = lora_scale(config, module)
        lora_a, lora_b = parts[a_key], parts[b_key]
        if config.get("use_bdlora") and not embedding:
            lora_a, lora_b = _unpack_block_diagonal(config["use_bdlora"], lora_a, lora_b, rank, shape)
        fan_in_fan_out = not embedding and _stored_transposed(shape, lora_a, lora_b, conv1d)
        if embedding:
            expected_a, expected_b = (rank, shape[0]), (shape[1], rank)
        else:
            out_dim, in_dim = shape[::-1] if fan_in_fan_out else shape
            expected_a, expected_b = (rank, in_dim), (out_dim, rank)
        if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
            vocab = lora_a.shape[-1] if embedding else lora_b.shape[0]
            hint = (
                f" (a vocabulary of {vocab} tokens, where the base has {shape[0]})"
                if (embedding or target == OUTPUT_NAME) and vocab != shape[0]
                else ""
            )
            raise _shape_error(
                adapter,
                f"{module} has {a_key} {tuple(lora_a.shape)} and {b_key} {tuple(lora_b.shape)} at rank {rank}{hint}",
                target,
                shape,
            )
        if "lora_diag" in parts and not kasa:
            raise InputError(
                f"{adapter.weights}: module {module} has a KaSA lora_diag, but {ADAPTER_CONFIG} sets no "
                "kasa_config; the config and the weights do not belong together. Re-save the adapter with PEFT."
            )
        if kasa:
            diag = parts.get("lora_diag")
            if embedding or fan_in_fan_out or diag is None or tuple(diag.shape) != (rank,):
                raise InputError(
                    f"{adapter.weights}: KaSA module {module} "
                    + (
                        "is not a plain Linear layer; PEFT's KaSA supports only nn.Linear, so the adapter is not one "
                        "PEFT wrote."
                        if embedding or fan_in_fan_out
                        else f"has no lora_diag of {rank} values; the adapter is incomplete."
                    )
                )
            if rank >= min(shape):
                raise _shape_error(adapter, f"KaSA module {module} has rank {rank}", target, shape)
            plan.add(target, KasaUpdate(lora_a, lora_b, diag, adapter.weight * scale, rank))
            continue
        magnitude = parts.get("lora_magnitude_vector")
        if use_dora:
            if magnitude is None or embedding:
                raise InputError(
                    f"{adapter.weights}: DoRA module {module} "
                    + (
                        "is an embedding; DoRA embeddings are not merged by edge-export."
                        if embedding
                        else "has no lora_magnitude_vector; the adapter is incomplete."
                    )
                )
            if adapter.weight != 1.0:
                raise InputError(
                    f"{adapter.path} is a DoRA adapter and cannot be given a weight ({adapter.weight}): its "
                    "magnitude vector sets absolute row norms. Merge it with weight 1."
                )
            out_rows = shape[1] if fan_in_fan_out else shape[0]
            if tuple(magnitude.shape) != (out_rows,):
                raise _shape_error(
                    adapter, f"{module} has a magnitude vector of {tuple(magnitude.shape)}", target, shape
                )
        plan.add(
            target,
            LoraUpdate(
                lora_a,
                lora_b,
                adapter.weight * scale,
                fan_in_fan_out,
                embedding,
                magnitude if use_dora else None,
            ),
        )
        if "lora_B.bias" in parts:
            bias_target = f"{module}.bias"
            if bias_target not in base_shapes:
                raise InputError(
                    f"{adapter.weights}: {module} has a trained LoRA bias (lora_bias=True) but the base layer has no "
                    "bias, so it cannot be merged (PEFT refuses this too)."
                )
            plan.add(bias_target, AddUpdate(parts["lora_B.bias"], adapter.weight * scale))


# Model types whose layers are transformers' Conv1D, which stores weights as (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def _stored_transposed(
    shape: tuple[int, ...], lora_a: torch.Tensor, lora_b: torch.Tensor, conv1d: bool
) -> bool:
    """Whether a weight is stored (in, out), as Conv1D stores it.

    Not the config's fan_in_fan_out: PEFT sets that per module from the layer's type (True for Conv1D,
    False for nn.Linear, with a warning either way), so a saved config can say true for an adapter
    whose Linear layers are plain. The shapes tell, except for square weights, which are Conv1D only
    in the GPT-2-style models that use it.
    """
    in_dim, out_dim = lora_a.shape[-1], lora_b.shape[0]
    if tuple(shape) == (out_dim, in_dim) and in_dim != out_dim:
        return False
    if tuple(shape) == (in_dim, out_dim) and in_dim != out_dim:
        return True
    return conv1d


def _unpack_block_diagonal(
    bdlora: dict[str, Any], lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-LoRA stores a block-diagonal A (r × in/n) or B (out × r/n) packed; expand it as PEFT's
    BlockDiagonalLinear.weight_as_blockdiagonal_matrix does (n = nblocks)."""
    blocks = int(bdlora.get("nblocks") or 1)
    out_dim, in_dim = shape
    if blocks > 1 and tuple(lora_a.shape) == (rank, in_dim // blocks):
        lora_a = torch.block_diag(*torch.chunk(lora_a, blocks, dim=0))
    if blocks > 1 and tuple(lora_b.shape) == (out_dim, rank // blocks):
        lora_b = torch.block_diag(*torch.chunk(lora_b, blocks, dim=0))
    return lora_a, lora_b


def _plan_ia3(
    adapter: LoraAdapter,
    names: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> None:
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    if adapter.weight != 1.0:
        raise InputError(
            f"{adapter.path} is an IA3 adapter, which rescales weights; it cannot be given a weight."
        )
    for name, vector in sorted(names.items()):
        match = re.match(r"^(.*)\.ia3_l(?:\.default)?$", name)
        if not match:
            raise InputError(f"{adapter.weights} holds tensor {name!r}, which is not an IA3 vector.")
        module = match.group(1)
        target = f"{module}.weight"
        shape = _require_target(adapter, target, base_shapes)
        oriented = vector.T if fan_in_fan_out else vector
        if vector.dim() != 2 or any(v not in (1, s) for v, s in zip(oriented.shape, shape, strict=True)):
            raise _shape_error(adapter, f"{module} has an IA3 vector of {tuple(vector.shape)}", target, shape)
        plan.add(target, ScaleUpdate(oriented))
        feedforward = vector.shape[0] == 1 and vector.shape[1] != 1
        if not feedforward and f"{module}.bias" in base_shapes:
            plan.add(f"{module}.bias", ScaleUpdate(vector.reshape(-1)))


def tied_embedding(base_shapes: dict[str, tuple[int, ...]], base_config: dict[str, Any]) -> str | None:
    """The embedding lm_head shares with the base (stored once), or None when the base is untied."""
    embedding = next((n for n in EMBEDDING_NAMES if n in base_shapes), None)
    if embedding and OUTPUT_NAME not in base_shapes and base_config.get("tie_word_embeddings", True):
        return embedding
    return None


def untie_if_one_side_changes(plan: MergePlan, embedding: str) -> bool:
    """Untie a tied embedding when the adapter changes it (as the unmerged model behaves).

    With tied weights the base stores only the embedding, and lm_head reads the same matrix. A LoRA or
    modules_to_save copy on either side changes that side alone in the unmerged PEFT model, so the
    merged model gets its own lm_head.weight (starting from the original embedding) and
    tie_word_embeddings=False.
    """
    if OUTPUT_NAME not in plan.updates and embedding not in plan.updates:
        return False
    plan.extra_outputs.append((OUTPUT_NAME, embedding))
    plan.config_changes["tie_word_embeddings"] = False
    return True


# -------------------------------------------------------------------------------------------- base side


class BaseModel:
    """The base's safetensors shards: tensor names, shapes and storage locations."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        files = base_shard_files(base_dir)
        self.entries: list[TensorEntry] = [entry for file in files for entry in read_header(file)]
        self.by_name = {entry.name: entry for entry in self.entries}
        self.shapes = {entry.name: entry.shape for entry in self.entries}

    def float_dtypes(self) -> set[str]:
        return {e.dtype for e in self.entries if e.dtype in ("F16", "BF16", "F32")}


def check_configs(adapter: LoraAdapter, base_config: dict[str, Any], base_dir: Path) -> None:
    """Refuse an adapter whose recorded base differs in shape from this base; warn about QLoRA."""
    where = adapter.path / ADAPTER_CONFIG
    hint = adapter.base_model_name_or_path
    if hint and QUANTIZED_BASE_HINT.search(hint):
        log.warning(
            "%s says the adapter was trained on %s, a quantized base (QLoRA). Merging onto the 16-bit base %s is "
            "right: the quantized weights approximate it, and re-quantizing a merge of dequantized weights would "
            "stack two rounding errors.",
            where,
            hint,
            base_dir,
        )
    if "quantization_config" in base_config:
        method = base_config["quantization_config"].get("quant_method", "quantized")
        raise InputError(
            f"{base_dir / 'config.json'} describes a {method} model; merging needs the original 16-bit base "
            "(fp16/bf16 safetensors) the quantized one was made from. Pass that with --base."
        )
    trained_config = _recorded_base_config(hint)
    if trained_config is not None:
        trained = json.loads(trained_config.read_text())
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if key in trained and key in base_config and trained[key] != base_config[key]:
                raise InputError(
                    f"{where} was trained on {hint} ({key}={trained[key]}), but the base {base_dir} has "
                    f"{key}={base_config[key]}. Pass the base the adapter was trained on."
                )


def _recorded_base_config(hint: str | None) -> Path | None:
    """config.json of the base the adapter recorded, when it is on this machine (folder or HF cache)."""
    if not hint:
        return None
    if Path(hint).is_dir():
        path = Path(hint) / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hint, "config.json")
    except Exception:  # noqa: BLE001 - an id that is not a valid repo name is simply not cached
        return None
    return Path(cached) if isinstance(cached, str) else None


def plan_merge(
    base: BaseModel, adapters: list[LoraAdapter], base_config: dict[str, Any]
) -> tuple[MergePlan, bool]:
    """Check every adapter against the base and decide every output tensor; nothing is written."""
    plan = MergePlan()
    shapes = dict(base.shapes)
    embedding = tied_embedding(shapes, base_config)
    if embedding:
        shapes[OUTPUT_NAME] = shapes[embedding]  # lm_head exists in the model, stored as the embedding
    kasa = [a for a in adapters if a.config.get("kasa_config") is not None]
    if kasa and len(adapters) > 1:
        raise InputError(
            f"{kasa[0].path / ADAPTER_CONFIG} is a KaSA adapter, which rewrites the base weights it was trained "
            "on (an SVD truncation), so it cannot be merged together with other adapters (PEFT refuses to "
            "combine them too). Export it on its own."
        )
    for adapter in adapters:
        check_configs(adapter, base_config, base.base_dir)
        plan_adapter(adapter, shapes, plan, conv1d=base_config.get("model_type") in CONV1D_MODEL_TYPES)
    untied = untie_if_one_side_changes(plan, embedding) if embedding else False
    return plan, untied


def merge_adapters(
    base_dir: Path,
    adapters: list[LoraAdapter],
    out_dir: Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
    provenance: dict[str, Any] | None = None,
) -> MergeResult:
    """Merge `adapters` into the base at `base_dir` and write a complete HF folder at `out_dir`.

    Without `dtype`, a bfloat16 base is written as float16 when it fits float16's range
    (choose_merge_dtype); should the merged values then overflow, the merge is redone in bfloat16.
    """
    base_config = json.loads((base_dir / "config.json").read_text())
    base = BaseModel(base_dir)
    plan, untied = plan_merge(base, adapters, base_config)
    choice = choose_merge_dtype(base_dir, dtype)
    if not dtype and base.float_dtypes() == {"F32"}:
        log.warning("%s is stored in float32; writing the merged model as float16", base_dir)
    try:
        return _write_merge(
            base, adapters, plan, untied, base_config, choice, out_dir, max_shard_bytes, progress, provenance
        )
    except _Float16Overflow as overflow:
        if dtype or "BF16" not in base.float_dtypes():
            raise
        choice = DtypeChoice(
            "bfloat16", f"the merged {overflow.tensor} exceeds float16's range: kept bfloat16"
        )
        return _write_merge(
            base, adapters, plan, untied, base_config, choice, out_dir, max_shard_bytes, progress, provenance
        )


def _write_merge(
    base: BaseModel,
    adapters: list[LoraAdapter],
    plan: MergePlan,
    untied: bool,
    base_config: dict[str, Any],
    choice: DtypeChoice,
    out_dir: Path,
    max_shard_bytes: int,
    progress: Callable[[int, int], None] | None,
    provenance: dict[str, Any] | None,
) -> MergeResult:
    base_dir = base.base_dir
    out_dtype = DTYPES[choice.dtype]

    extra_after = {source: name for name, source in plan.extra_outputs}
    layout: list[PlannedTensor] = []
    for entry in base.entries:
        tensor_dtype = out_dtype if entry.dtype in ("F16", "BF16", "F32") else SAFETENSORS_DTYPES[entry.dtype]
        layout.append(PlannedTensor(entry.name, tensor_dtype, entry.shape))
        if entry.name in extra_after:
            layout.append(PlannedTensor(extra_after[entry.name], tensor_dtype, entry.shape))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model folder
    writer = StreamingShardWriter(staging, layout, max_shard_bytes)
    watch = _RangeWatch(base_dir, adapters, out_dtype)
    try:
        for done, (entry, tensor) in enumerate(iter_tensors(base.entries), start=1):
            _write_merged(writer, entry.name, tensor, plan, out_dtype, watch)
            if entry.name in extra_after:
                _write_merged(writer, extra_after[entry.name], tensor, plan, out_dtype, watch)
            if progress:
                progress(done, len(base.entries))
        shard_count = writer.finish()
        _write_side_files(
            base_dir,
            tokenizer_source(adapters, base_dir),
            staging,
            base_config,
            out_dtype,
            plan.config_changes,
        )
        merged_names = set(plan.updates) | {name for name, _ in plan.extra_outputs}
        if provenance is not None:
            record = {
                **provenance,
                "dtype": choice.dtype,
                "dtype_reason": choice.why,
                "shards": shard_count,
                "merged_tensors": sorted(merged_names),
                "config_changes": plan.config_changes,
                "max_abs": watch.max_abs,
            }
            (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        writer.abort()
        if staging.exists():
            shutil.rmtree(staging)
    return MergeResult(
        out_dir,
        len(merged_names),
        len(layout),
        choice.dtype,
        shard_count,
        untied,
        dict(writer.digests),
        watch.max_abs,
        choice.why,
    )


class _Float16Overflow(InputError):
    """A value beyond float16's range met a float16 output."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


class _RangeWatch:
    """Finite values only, whatever the dtypes: the largest |value| written (bfloat16/float32 outputs,
    which may not fit float16 later), and no tensor cast from bfloat16/float32 to float16 may overflow."""

    def __init__(self, base_dir: Path, adapters: list[LoraAdapter], out_dtype: torch.dtype):
        self.base_dir = base_dir
        self.adapter_files = ", ".join(str(a.weights) for a in adapters)
        self.out_dtype = out_dtype
        self.max_abs: float | None = None if out_dtype == torch.float16 else 0.0

    def check(self, name: str, tensor: torch.Tensor, cast_from: torch.dtype | None, merged: bool) -> None:
        """`tensor` as written; `cast_from` is the dtype it was cast from (None when it was not cast)."""
        narrowed = self.out_dtype == torch.float16 and cast_from not in (None, torch.float16)
        if not (merged or narrowed or self.max_abs is not None) or not tensor.numel():
            return
        # NaN propagates through min/max and ±Inf shows there (one fast pass; isfinite is ~50x slower).
        low, high = (v.item() for v in torch.aminmax(tensor))
        if math.isfinite(low) and math.isfinite(high):
            if self.max_abs is not None:
                self.max_abs = max(self.max_abs, abs(low), abs(high))
            return
        if narrowed and not merged:
            raise _Float16Overflow(
                f"The base tensor {name} in {self.base_dir} holds values beyond float16's range (±65504), "
                "so writing the model as float16 would turn them into Inf. Keep the base's own precision: "
                "drop --dtype float16 (a bfloat16 base that does not fit float16 stays bfloat16), or pass "
                "--dtype bfloat16.",
                name,
            )
        if narrowed:
            raise _Float16Overflow(
                f"Merging into {name} gives values beyond float16's range (±65504), which would be Inf in a "
                "float16 model. Pass --dtype bfloat16 (or drop --dtype float16) to keep them. Nothing was written.",
                name,
            )
        raise InputError(
            f"Merging into {name} produced NaN or Inf values: the adapter weights in {self.adapter_files} are "
            "corrupt or overflow. Nothing was written."
        )


def _write_merged(
    writer: StreamingShardWriter,
    name: str,
    tensor: torch.Tensor,
    plan: MergePlan,
    out_dtype: torch.dtype,
    watch: _RangeWatch,
) -> None:
    updates = plan.updates.get(name)
    source_dtype = tensor.dtype
    if updates:
        merged = tensor.to(torch.float32, copy=True)  # a working copy: updates apply in place
        for update in updates:
            merged = update.apply(merged)
        tensor = merged.to(out_dtype)
        # Checked after the cast, so values that overflow the output dtype are caught too.
        watch.check(name, tensor, source_dtype, merged=True)
    elif tensor.is_floating_point():
        tensor = tensor.to(out_dtype)
        watch.check(name, tensor, source_dtype if source_dtype != out_dtype else None, merged=False)
    writer.write(name, tensor)


def _write_side_files(
    base_dir: Path,
    tokenizer_dir: Path,
    staging: Path,
    base_config: dict[str, Any],
    dtype: torch.dtype,
    config_changes: dict[str, Any],
) -> None:
    config = portable_config({**base_config, **config_changes}, str(dtype).removeprefix("torch."))
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    own_template = read_chat_template(tokenizer_dir) is not None
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name
        # The base's chat template must not override the one the adapter's tokenizer carries.
        if (
            not source.is_file()
            and tokenizer_dir != base_dir
            and not (own_template and name in CHAT_TEMPLATE_FILES)
        ):
            source = base_dir / name
        if source.is_file():
            shutil.copyfile(source, staging / name)
    _make_tokenizer_portable(staging)
    for name in PASSTHROUGH_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, staging / name)
    for entry in base_dir.iterdir():
        if entry.is_file() and LICENSE_PATTERN.match(entry.name):
            shutil.copyfile(entry, staging / entry.name)


def _make_tokenizer_portable(folder: Path) -> None:
    """The merged folder's tokenizer files in the dialect transformers 4 and 5 and the converter all read.

    tokenizer_config.json loses the 5.x-only spellings, and a template kept only in chat_template.json (which
    the converter does not read) is also written as chat_template.jinja.
    """
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(
                f"The tokenizer's {config_file.name} is not valid JSON ({exc}); re-save the tokenizer with "
                "transformers' save_pretrained."
            ) from exc
        if isinstance(config, dict):
            portable = portable_tokenizer_config(config)
            if portable != config:
                config_file.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n")
    template = read_chat_template(folder)
    if isinstance(template, str) and read_chat_template(folder, include_processor=False) is None:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
