"""The merge plan: every adapter checked against the base, every output tensor decided; nothing written."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.inputs.base_config import read_base_config, recorded_base_config
from exporter.inputs.checkpoint_names import memory_to_stored
from exporter.inputs.safetensors_header import base_shard_files
from exporter.inputs.safetensors_io import TensorEntry, read_header
from exporter.inputs.trained_on import recorded_four_bit
from exporter.merge.adapter_plan import plan_adapter
from exporter.merge.lora_layout import CONV1D_MODEL_TYPES
from exporter.merge.updates import MergePlan, Replacement
from exporter.merge.vocab import EMBEDDING_NAMES, OUTPUT_NAME, check_vocab_complete, same_updates

log = logging.getLogger(__name__)

QUANTIZED_BASE_HINT = re.compile(r"bnb|4bit|4-bit|nf4|gptq|awq|int4|8bit", re.IGNORECASE)


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
    # A recorded 4-bit base whose config is on this machine is a QLoRA adapter merge-quantize handles as one.
    if hint and QUANTIZED_BASE_HINT.search(hint) and not recorded_four_bit(hint):
        log.warning(
            "%s says the adapter was trained on %s, a quantized base (QLoRA), and it is merged onto the 16-bit "
            "base %s. merge-quantize checks it against the model as trained and compares both merge bases when "
            "it knows the 4-bit format (that base's config.json, or --trained-on nf4|fp4).",
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
    trained_config = recorded_base_config(hint)
    if trained_config is not None:
        trained = read_base_config(trained_config.parent)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if key in trained and key in base_config and trained[key] != base_config[key]:
                raise InputError(
                    f"{where} was trained on {hint} ({key}={trained[key]}), but the base {base_dir} has "
                    f"{key}={base_config[key]}. Pass the base the adapter was trained on."
                )


def plan_merge(
    base: BaseModel, adapters: list[LoraAdapter], base_config: dict[str, Any]
) -> tuple[MergePlan, bool]:
    """Check every adapter against the base and decide every output tensor; nothing is written."""
    plan = MergePlan(model_type=base_config.get("model_type"))
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
        conv1d = base_config.get("model_type") in CONV1D_MODEL_TYPES
        plan_adapter(
            adapter, shapes, plan, conv1d, lambda: memory_to_stored(base.base_dir, frozenset(base.shapes))
        )
    untied = untie_if_one_side_changes(plan, embedding) if embedding else False
    check_vocab_complete(plan, adapters, base.shapes)
    return plan, untied


def tied_embedding(base_shapes: dict[str, tuple[int, ...]], base_config: dict[str, Any]) -> str | None:
    """The embedding lm_head shares with the base (stored once), or None when the base is untied."""
    embedding = next((n for n in EMBEDDING_NAMES if n in base_shapes), None)
    if embedding and OUTPUT_NAME not in base_shapes and base_config.get("tie_word_embeddings", True):
        return embedding
    return None


def untie_if_one_side_changes(plan: MergePlan, embedding: str) -> bool:
    """Untie a tied embedding when the adapter changes one side only (as the unmerged model behaves).

    With tied weights the base stores only the embedding, and lm_head reads the same matrix. A LoRA or
    modules_to_save copy on either side changes that side alone in the unmerged PEFT model, so the
    merged model gets its own lm_head.weight (starting from the original embedding, or from the resized
    embedding PEFT saved beside a LoRA on it) and tie_word_embeddings=False. When both sides get the
    same trained matrix (trained token rows on a tied embedding) they stay tied.
    """
    embedding_updates, output_updates = plan.updates.get(embedding), plan.updates.get(OUTPUT_NAME)
    if not output_updates and not embedding_updates:
        return False
    if same_updates(embedding_updates, output_updates):
        del plan.updates[OUTPUT_NAME]
        plan.shapes.pop(OUTPUT_NAME, None)
        return False
    first = next(iter(embedding_updates or []), None)
    if isinstance(first, Replacement) and first.base_layer and not _replaced(output_updates):
        # lm_head is the very parameter PEFT saved as the embedding's base layer.
        plan.updates[OUTPUT_NAME] = [first, *(output_updates or [])]
        if embedding in plan.shapes:
            plan.shapes[OUTPUT_NAME] = plan.shapes[embedding]
    plan.extra_outputs.append((OUTPUT_NAME, embedding))
    plan.config_changes["tie_word_embeddings"] = False
    return True


def _replaced(updates: list[Any] | None) -> bool:
    return bool(updates) and isinstance(updates[0], Replacement)  # type: ignore[index]
