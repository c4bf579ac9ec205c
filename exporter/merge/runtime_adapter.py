"""What can run as a llama.cpp runtime LoRA on a base, and how a GGUF LoRA names the base it was made for.

llama.cpp applies a GGUF LoRA as alpha / rank · B·A with the global alpha; PEFT's scaling can differ
per module (rsLoRA, alpha_pattern, an adapter weight), so the difference is folded into lora_B
(`ScaleCorrection`). A GGUF LoRA records the identity of its base GGUF (architecture, a UUID derived
from the base's files, the sha256 of the F16 base and of its tensor shapes), and `check_pair` refuses
to apply it to another base.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.gguf_header import read_gguf_metadata
from converters.lora_to_gguf import KEY_PREFIX
from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.inputs.base_config import read_base_config
from exporter.inputs.tokenizer_files import saved_vocab_rows, tokenizer_size
from exporter.merge import BaseModel, LoraUpdate, MergePlan, plan_merge
from exporter.merge.experts import is_fused_module, unwrapped

MERGED_PATH_HINT = (
    "Use `edge-export merge-quantize` for this adapter instead: it merges the adapter into the base."
)


@dataclass(frozen=True)
class ScaleCorrection:
    """How one adapter's scaling is made right for llama.cpp: a factor per module folded into lora_B."""

    factors: dict[str, float]
    reasons: tuple[str, ...]  # what the converter alone would get wrong, e.g. "use_rslora"
    # Fused mixture-of-experts LoRA (PEFT target_parameters), which the converter cannot read, written per
    # expert under the base's stored names: module → (lora_A, lora_B), replacing the `dropped` modules.
    expanded: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    @property
    def corrected_modules(self) -> int:
        return sum(1 for f in self.factors.values() if abs(f - 1.0) > 1e-12)


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
    base_config = read_base_config(base_dir)
    changed = vocabulary_change(adapter, base_dir, base_config)
    if changed:
        raise refuse(
            f"the adapter changes the vocabulary ({changed}): a runtime adapter cannot add tokens or rows"
        )
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

    # The merge planner checks names, shapes and the recorded base, exactly as for merge-quantize.
    plan, untied = plan_merge(BaseModel(base_dir), [adapter], base_config)
    if untied:
        raise refuse(
            "the adapter changes lm_head or the token embedding of a base that ties the two (one matrix for both)"
        )
    expanded, dropped = _per_expert(plan, refuse)
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
    return ScaleCorrection(factors, reasons, expanded, dropped)


def _per_expert(
    plan: MergePlan, refuse: Callable[[str], InputError]
) -> tuple[dict[str, tuple[Any, Any]], tuple[str, ...]]:
    """Fused expert LoRA as one LoRA per expert and projection, the form llama.cpp's converter stacks into
    its expert tensors (applied at run time by build_lora_mm_id)."""
    expanded: dict[str, tuple[Any, Any]] = {}
    fused = {s: t for c in plan.coverage for s, t in c.placed.items() if is_fused_module(s)}
    for source, targets in fused.items():
        for target in targets:
            update = plan.updates[target][0]
            if not isinstance(update, LoraUpdate):
                raise refuse(
                    f"the adapter trains the fused experts {unwrapped(source)}, which this base stores as one 3-D "
                    f"tensor ({target}); llama.cpp's LoRA converter reads expert LoRA only per expert"
                )
            # Copies: gate and up share expert e's A, and safetensors refuses tensors that share memory.
            expanded[target.removesuffix(".weight")] = (update.lora_a.clone(), update.lora_b.clone())
    return expanded, tuple(sorted(fused))


def vocabulary_change(adapter: LoraAdapter, base_dir: Path, base_config: dict[str, Any]) -> str | None:
    """How the adapter's vocabulary differs from the base's (resized matrices, added tokens), or None."""
    base_rows = base_config.get("vocab_size")
    rows = saved_vocab_rows(adapter)
    if rows is not None and base_rows is not None and rows != base_rows:
        return f"{rows} embedding rows where the base has {base_rows}"
    tokens, base_tokens = tokenizer_size(adapter.path), tokenizer_size(base_dir)
    if tokens is not None and base_tokens is not None and tokens > base_tokens:
        return f"its tokenizer has {tokens - base_tokens} tokens more than the base's"
    return None


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


def describe_correction(correction: ScaleCorrection) -> str:
    if not correction.corrected_modules:
        return "none needed (alpha / r is what llama.cpp applies)"
    factors = sorted({round(f, 6) for f in correction.factors.values()})
    return (
        f"lora_b of {correction.corrected_modules} modules multiplied by {', '.join(map(str, factors))} "
        f"for {', '.join(correction.reasons) or 'per-module scaling'}"
    )
