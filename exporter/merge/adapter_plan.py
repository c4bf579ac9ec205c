"""One adapter's updates, checked against the base's tensor names and shapes before anything is written:
LoRA and its variants (DoRA, KaSA, BD-LoRA, trained LoRA biases, Conv1D and embedding layers), IA3, and
the full tensors an adapter trains (modules_to_save, bias="all"/"lora_only")."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.inputs.dialects import classify_full_key
from exporter.inputs.safetensors_io import iter_tensors, read_header
from exporter.merge.coverage import require_target, shape_error
from exporter.merge.experts import is_fused_module, layout_for, plan_fused_experts
from exporter.merge.ia3 import plan_ia3
from exporter.merge.lora_layout import lora_scale, stored_transposed, unpack_block_diagonal
from exporter.merge.updates import (
    AdapterCoverage,
    AddUpdate,
    KasaUpdate,
    LoraUpdate,
    MergePlan,
    Replacement,
)
from exporter.merge.vocab import OUTPUT_NAME, VOCAB_TENSORS, pop_token_rows, resize_vocab, token_rows_update

PEFT_PREFIX = "base_model.model."
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


def plan_adapter(
    adapter: LoraAdapter,
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
    conv1d: bool = False,
    stored_as: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Add one adapter's updates to the plan, checking names, shapes and features against the base.
    `stored_as`: the base's in-memory tensor names → its stored ones, where transformers renames them when
    loading (exporter.inputs.checkpoint_names), asked for only when an adapter module is not stored as named."""
    check_adapter_type(adapter)
    tensors = load_adapter_tensors(adapter)
    if not tensors:
        raise InputError(f"{adapter.weights} holds no tensors; the adapter is empty.")
    names = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}
    if stored_as is not None:
        names = _as_stored(names, base_shapes, stored_as)
    plan.coverage.append(AdapterCoverage(str(adapter.weights), len(names)))
    if adapter.peft_type == "IA3":
        plan_ia3(adapter, names, base_shapes, plan)
    else:
        _plan_lora(adapter, names, base_shapes, plan, conv1d)


def _as_stored(
    names: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    stored_as: Callable[[], dict[str, str]],
) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors named after the base tensors they change as stored, where the adapter names
    a module as transformers 5 has it in memory and the base's shards store it under another name."""
    modules = {key: m.group(1) for key in names if (m := _LORA_PART.match(key))}
    if all(f"{module}.weight" in base_shapes for module in modules.values()):
        return names
    renamed = stored_as()
    result = {}
    for key, tensor in names.items():
        module = modules.get(key)
        stored = None if module is None else renamed.get(f"{module}.weight")
        if module is not None and stored is not None and f"{module}.weight" not in base_shapes:
            key = stored.removesuffix(".weight") + key[len(module) :]
        result[key] = tensor
    return result


_LORA_PART = re.compile(
    r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|lora_diag)"
    r"(?:\.default)?(?:\.(weight|bias))?$"
)


def _plan_lora(
    adapter: LoraAdapter,
    names: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
    conv1d: bool,
) -> None:
    token_rows = pop_token_rows(names)
    modules, full, skipped = _sort_lora_tensors(adapter.config, names)
    ledger = plan.coverage[-1]
    ledger.skipped.update(skipped)
    layer_modules = set(modules) | set(token_rows)
    # Full tensors first: a saved base-layer weight is what that module's LoRA delta is added to (and it
    # may resize the vocabulary, which the LoRA matrices and trained rows are then checked against).
    for name, tensor in sorted(full.items()):
        _plan_full_tensor(adapter, name, tensor, layer_modules, base_shapes, plan)
        ledger.place(name, [name], 1)
    for module, rows in sorted(token_rows.items()):
        target = f"{module}.weight"
        shape = require_target(adapter, target, base_shapes, plan)
        plan.add(target, token_rows_update(adapter, module, rows, shape))
        ledger.place(module, [target], 1)
    layout = layout_for({"model_type": plan.model_type})
    fused = {m: p for m, p in modules.items() if f"{m}.weight" not in base_shapes and is_fused_module(m)}
    if fused and layout is not None:
        for module, targets in plan_fused_experts(adapter, layout, fused, base_shapes, plan).items():
            ledger.place(module, targets, len(fused[module]))
    for module, parts in sorted(modules.items()):
        if module in fused and layout is not None:
            continue
        stored = layout.stored_module(module) if layout is not None else None
        if f"{module}.weight" not in base_shapes and stored and f"{stored}.weight" in base_shapes:
            module = stored  # transformers 5's name in memory for a module stored under another name
        targets = _plan_lora_module(adapter, module, parts, base_shapes, plan, conv1d)
        ledger.place(module, targets, len(parts))


def _sort_lora_tensors(
    config: dict[str, Any], names: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors as (each module's LoRA parts by part name, the full tensors it trained, the
    tensors that change nothing with why)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    trained_copies: set[str] = set()
    sources: dict[str, str] = {}  # full tensor → the adapter key it was read from
    for name, tensor in names.items():
        match = _LORA_PART.match(name)
        if match:
            part = match.group(2) + (".bias" if match.group(3) == "bias" else "")
            modules.setdefault(match.group(1), {})[part] = tensor
            continue
        if any(config.get(key) and marker in name for key, marker in TRAINING_ONLY_TENSORS.items()):
            skipped[name] = "acts only while training"
            continue
        key = classify_full_key(name)
        if key.kind == "original copy":
            # the base's own weights, saved beside the trained copy by some PEFT versions
            skipped[name] = "the base's own copy, saved beside the trained one"
            continue
        plain_copy = "a plain copy beside the trained one, which PEFT loads instead"
        if key.kind == "trained copy":
            trained_copies.add(key.name)
            if key.name in sources:  # the plain copy came first
                skipped[sources[key.name]] = plain_copy
        elif key.name in trained_copies:
            skipped[name] = plain_copy
            continue
        elif key.name in sources:  # saved under two names (e.g. with and without base_layer): the later wins
            skipped[sources[key.name]] = f"saved again as {name}, which is used"
        full[key.name] = tensor
        sources[key.name] = name
    return modules, full, skipped


def _plan_full_tensor(
    adapter: LoraAdapter,
    name: str,
    tensor: torch.Tensor,
    layer_modules: set[str],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> None:
    """A full tensor the adapter trained replaces the base's, when PEFT would load it over the base."""
    module = name.rsplit(".", 1)[0]
    is_saved_module = _matches_module(module, adapter.config.get("modules_to_save"))
    is_trained_bias = name.endswith(".bias") and adapter.config.get("bias", "none") in ("all", "lora_only")
    # With embedding layers among the targets PEFT also saves their base weights, which it loads
    # over the base's; they are the weights the LoRA was trained on top of.
    is_saved_base_layer = name.endswith(".weight") and module in layer_modules
    # A resized vocabulary: PEFT saves the embedding and output layers whole (save_embedding_layers "auto").
    is_saved_vocab_layer = name in VOCAB_TENSORS and tuple(tensor.shape) != base_shapes.get(name)
    if not (is_saved_module or is_trained_bias or is_saved_base_layer or is_saved_vocab_layer):
        raise InputError(
            f"{adapter.weights} holds tensor {name!r}, which is neither a LoRA matrix nor listed in "
            "modules_to_save; edge-export does not know how to merge it."
        )
    if adapter.weight != 1.0:
        raise InputError(
            f"{adapter.path} replaces {name} outright (modules_to_save or a trained bias), so it cannot be given "
            f"a weight ({adapter.weight}). Merge it with weight 1."
        )
    shape = require_target(adapter, name, base_shapes, plan)
    if tuple(tensor.shape) != shape and not resize_vocab(
        adapter, name, tuple(tensor.shape), base_shapes, plan
    ):
        raise shape_error(adapter, f"{name} is {tuple(tensor.shape)}", name, shape)
    plan.add(name, Replacement(tensor, base_layer=is_saved_base_layer and not is_saved_module))


@dataclass(frozen=True)
class _ModuleLora:
    """One module's LoRA matrices, unpacked and checked against the base weight they update."""

    module: str
    target: str
    shape: tuple[int, ...]
    rank: int
    scale: float  # PEFT's scaling, before the adapter's weight
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    embedding: bool
    fan_in_fan_out: bool


def _plan_lora_module(
    adapter: LoraAdapter,
    module: str,
    parts: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
    conv1d: bool,
) -> list[str]:
    """Plan one module's LoRA; returns the base tensors it changes."""
    lora = _module_lora(adapter, module, parts, base_shapes, plan, conv1d)
    kasa = adapter.config.get("kasa_config") is not None
    if "lora_diag" in parts and not kasa:
        raise InputError(
            f"{adapter.weights}: module {module} has a KaSA lora_diag, but {ADAPTER_CONFIG} sets no "
            "kasa_config; the config and the weights do not belong together. Re-save the adapter with PEFT."
        )
    if kasa:
        plan.add(lora.target, _kasa_update(adapter, lora, parts.get("lora_diag")))
        return [lora.target]
    magnitude = _dora_magnitude(adapter, lora, parts.get("lora_magnitude_vector"))
    scale = adapter.weight * lora.scale
    plan.add(
        lora.target,
        LoraUpdate(lora.lora_a, lora.lora_b, scale, lora.fan_in_fan_out, lora.embedding, magnitude),
    )
    if "lora_B.bias" in parts:
        bias_target = f"{module}.bias"
        if bias_target not in base_shapes:
            raise InputError(
                f"{adapter.weights}: {module} has a trained LoRA bias (lora_bias=True) but the base layer has no "
                "bias, so it cannot be merged (PEFT refuses this too)."
            )
        plan.add(bias_target, AddUpdate(parts["lora_B.bias"], scale))
        return [lora.target, bias_target]
    return [lora.target]


def _module_lora(
    adapter: LoraAdapter,
    module: str,
    parts: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
    conv1d: bool,
) -> _ModuleLora:
    """The module's A and B (BD-LoRA unpacked), oriented as the base weight is stored, shapes checked."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        raise InputError(
            f"{adapter.weights}: module {module} lacks {a_key} or {b_key}; the adapter is incomplete."
        )
    target = f"{module}.weight"
    shape = require_target(adapter, target, base_shapes, plan)
    rank, scale = lora_scale(adapter.config, module)
    lora_a, lora_b = parts[a_key], parts[b_key]
    if adapter.config.get("use_bdlora") and not embedding:
        lora_a, lora_b = unpack_block_diagonal(adapter.config["use_bdlora"], lora_a, lora_b, rank, shape)
    fan_in_fan_out = not embedding and stored_transposed(shape, lora_a, lora_b, conv1d)
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
        raise shape_error(
            adapter,
            f"{module} has {a_key} {tuple(lora_a.shape)} and {b_key} {tuple(lora_b.shape)} at rank {rank}{hint}",
            target,
            shape,
        )
    return _ModuleLora(module, target, shape, rank, scale, lora_a, lora_b, embedding, fan_in_fan_out)


def _kasa_update(adapter: LoraAdapter, lora: _ModuleLora, diag: torch.Tensor | None) -> KasaUpdate:
    rank, shape = lora.rank, lora.shape
    if lora.embedding or lora.fan_in_fan_out or diag is None or tuple(diag.shape) != (rank,):
        raise InputError(
            f"{adapter.weights}: KaSA module {lora.module} "
            + (
                "is not a plain Linear layer; PEFT's KaSA supports only nn.Linear, so the adapter is not one "
                "PEFT wrote."
                if lora.embedding or lora.fan_in_fan_out
                else f"has no lora_diag of {rank} values; the adapter is incomplete."
            )
        )
    if rank >= min(shape):
        raise shape_error(adapter, f"KaSA module {lora.module} has rank {rank}", lora.target, shape)
    return KasaUpdate(lora.lora_a, lora.lora_b, diag, adapter.weight * lora.scale, rank)


def _dora_magnitude(
    adapter: LoraAdapter, lora: _ModuleLora, magnitude: torch.Tensor | None
) -> torch.Tensor | None:
    """The module's DoRA magnitude vector, one value per output row of the weight (None: not DoRA)."""
    if not adapter.config.get("use_dora"):
        if magnitude is not None:
            raise InputError(
                f"{adapter.weights}: {lora.module} has DoRA's lora_magnitude_vector, but {ADAPTER_CONFIG} does "
                "not set use_dora (torchtune 0.6 saves DoRA adapters so): PEFT would drop the magnitudes and run "
                'another model. If the adapter was trained with DoRA, set "use_dora": true in the config.'
            )
        return None
    if magnitude is None or lora.embedding:
        raise InputError(
            f"{adapter.weights}: DoRA module {lora.module} "
            + (
                "is an embedding; DoRA embeddings are not merged by edge-export."
                if lora.embedding
                else "has no lora_magnitude_vector; the adapter is incomplete."
            )
        )
    if adapter.weight != 1.0:
        raise InputError(
            f"{adapter.path} is a DoRA adapter and cannot be given a weight ({adapter.weight}): its "
            "magnitude vector sets absolute row norms. Merge it with weight 1."
        )
    out_rows = lora.shape[1] if lora.fan_in_fan_out else lora.shape[0]
    if tuple(magnitude.shape) != (out_rows,):
        raise shape_error(
            adapter,
            f"{lora.module} has a magnitude vector of {tuple(magnitude.shape)}",
            lora.target,
            lora.shape,
        )
    return magnitude
