"""Adapters that changed the vocabulary: added tokens, resized (padded) embeddings, trained token rows.

How trainers do it: `tokenizer.add_special_tokens(...)` and `model.resize_token_embeddings(len(tokenizer),
pad_to_multiple_of=64)` (TRL's setup_chat_format, axolotl's `tokens:`), then embed_tokens and lm_head
trained in full (modules_to_save, or PEFT saving the resized layers beside a LoRA: `save_embedding_layers`),
or only some rows (`trainable_token_indices`, whose trained rows replace the layer's rows). PEFT then
saves embedding matrices with the new number of rows; the tokenizer saved beside the adapter is the
model's tokenizer.

The merge takes the adapter's rows as they are. A padded vocabulary (more rows than tokenizer entries) is
never shrunk: the row count is the trained matrix's, and config.json's vocab_size follows it. Every
vocabulary-sized output must come from rows the adapter saved: an output layer whose new rows were
initialised at random in training and never saved cannot be reproduced, so it is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.inputs.tokenizer_files import special_token_ids, tokenizer_size
from exporter.merge.updates import MergePlan, Replacement, TokenRows, Update

EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
)
OUTPUT_NAME = "lm_head.weight"
VOCAB_TENSORS = (*EMBEDDING_NAMES, OUTPUT_NAME)
# PEFT's trainable_token_indices: <m>.token_adapter.trainable_tokens_delta[.<adapter>] holds the trained
# rows' values (they replace the rows, PEFT's index_copy), <m>.token_adapter.base_layer.weight the layer.
TOKEN_ROWS = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")


def pop_token_rows(names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the trained token rows out of an adapter's tensors, by the module they belong to."""
    rows = {}
    for name in [n for n in names if TOKEN_ROWS.match(n)]:
        rows[TOKEN_ROWS.match(name).group("module")] = names.pop(name)  # type: ignore[union-attr]
    return rows


def token_row_indices(adapter: LoraAdapter, module: str) -> list[int]:
    """The token ids whose rows `module` trains, from the config's list (the embedding and, tied, lm_head)
    or its {module name: ids} table."""
    setting = adapter.config.get("trainable_token_indices")
    if isinstance(setting, dict):
        for name, ids in setting.items():
            if module == name or module.endswith(f".{name}"):
                return [int(i) for i in ids]
        raise InputError(
            f"{adapter.weights} holds trained token rows for {module}, but trainable_token_indices in "
            f"{adapter.path / ADAPTER_CONFIG} lists no indices for it; the config and the weights do not belong "
            "together. Re-save the adapter with PEFT."
        )
    if isinstance(setting, list):
        return [int(i) for i in setting]
    raise InputError(
        f"{adapter.weights} holds trained token rows (token_adapter.trainable_tokens_delta) for {module}, but "
        f"{adapter.path / ADAPTER_CONFIG} sets no trainable_token_indices. Re-save the adapter with PEFT."
    )


def token_rows_update(
    adapter: LoraAdapter, module: str, rows: torch.Tensor, shape: tuple[int, ...]
) -> TokenRows:
    indices = token_row_indices(adapter, module)
    if rows.dim() != 2 or rows.shape[0] != len(indices) or rows.shape[1] != shape[1]:
        raise InputError(
            f"{adapter.weights}: {module} has trained token rows of {tuple(rows.shape)} for {len(indices)} "
            f"indices, which do not fit its weight {shape}. Re-save the adapter with PEFT."
        )
    if indices and max(indices) >= shape[0]:
        raise InputError(
            f"trainable_token_indices in {adapter.path / ADAPTER_CONFIG} names row {max(indices)}, but {module} has "
            f"{shape[0]} rows: the adapter was trained on a larger vocabulary than the one it saved. Re-save it "
            "with PEFT (save_embedding_layers=True)."
        )
    if adapter.weight != 1.0:
        raise InputError(
            f"{adapter.path} replaces embedding rows outright (trainable_token_indices), so it cannot be given a "
            f"weight ({adapter.weight}). Merge it with weight 1."
        )
    return TokenRows(torch.tensor(indices, dtype=torch.int64), rows)


def resize_vocab(
    adapter: LoraAdapter,
    name: str,
    shape: tuple[int, ...],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> bool:
    """Accept a saved vocabulary matrix with another number of rows than the base's; False when the shapes
    differ in another way (a different base)."""
    base_shape = base_shapes[name]
    if name not in VOCAB_TENSORS or shape[1:] != base_shape[1:]:
        return False
    if plan.vocab_rows not in (None, shape[0]):
        raise InputError(
            f"{adapter.weights} saves {name} with {shape[0]} rows, but another vocabulary matrix of the merge has "
            f"{plan.vocab_rows}: the embedding and the output layer must have the same vocabulary. Re-save the "
            "adapter from the model it was trained as."
        )
    plan.vocab_rows = shape[0]
    plan.vocab_owner = adapter
    plan.shapes[name] = shape
    base_shapes[name] = shape
    return True


def same_updates(one: list[Update] | None, other: list[Update] | None) -> bool:
    """Both sides of a tied embedding get the same trained matrix (so they stay tied)."""
    if not one or not other or len(one) != len(other):
        return False
    for a, b in zip(one, other, strict=True):
        if type(a) is not type(b):
            return False
        if isinstance(a, Replacement) and isinstance(b, Replacement):
            if a.tensor.shape != b.tensor.shape or not torch.equal(a.tensor, b.tensor):
                return False
        elif isinstance(a, TokenRows) and isinstance(b, TokenRows):
            if not (torch.equal(a.indices, b.indices) and torch.equal(a.rows, b.rows)):
                return False
        else:
            return False
    return True


def check_vocab_complete(
    plan: MergePlan, adapters: list[LoraAdapter], base_shapes: dict[str, tuple[int, ...]]
) -> None:
    """With a changed vocabulary every vocabulary-sized output must start from rows the adapter saved."""
    rows, owner = plan.vocab_rows, plan.vocab_owner
    if rows is None or owner is None:
        return
    if len(adapters) > 1:
        raise InputError(
            f"{owner.weights} changes the vocabulary to {rows} rows; such an adapter must be merged on its own "
            "(the other adapters were trained on the base's vocabulary). Export it alone."
        )
    outputs = [n for n in VOCAB_TENSORS if n in base_shapes] + [n for n, _ in plan.extra_outputs]
    for name in outputs:
        first = next(iter(plan.updates.get(name) or []), None)
        if not (isinstance(first, Replacement) and first.tensor.shape[0] == rows):
            raise InputError(
                f"{owner.weights} resized the vocabulary to {rows} rows but does not save {name} with them: its new "
                "rows were initialised at random in training and are not in the adapter, so the trained model "
                "cannot be rebuilt. Save the adapter with the layer in modules_to_save (or PEFT's "
                "save_embedding_layers=True) and export again."
            )
    plan.config_changes["vocab_size"] = rows


def check_tokenizer_fits(plan: MergePlan, tokenizer_dir: Path, base_dir: Path, rows: int) -> None:
    """The model's tokenizer (the adapter's, when it saved one) must have a row for each of its tokens."""
    size = tokenizer_size(tokenizer_dir)
    owner = plan.vocab_owner
    if plan.vocab_rows is not None and owner is not None and tokenizer_dir == base_dir:
        resized = ", ".join(sorted(plan.shapes))
        raise InputError(
            f"{owner.weights} saves {resized} with {plan.vocab_rows} rows, a vocabulary other than the base's "
            f"({base_dir}), and {owner.path} holds no tokenizer. Either the adapter was trained for a different "
            "base (pass the matching --base), or it added tokens and the tokenizer that names them is missing "
            "(save the tokenizer you trained with beside the adapter: tokenizer.save_pretrained(adapter_dir))."
        )
    added = size is not None and tokenizer_dir != base_dir and size > (tokenizer_size(base_dir) or 0)
    if added and size is not None and size > rows:
        raise InputError(
            f"The tokenizer in {tokenizer_dir} has {size} tokens, but the merged model has only {rows} embedding "
            "rows: its added tokens have no trained rows. Resize the embeddings to the tokenizer "
            "(model.resize_token_embeddings) before training, and save them with the adapter."
        )


def special_token_changes(tokenizer_dir: Path, base_dir: Path, base_config: dict[str, Any]) -> dict[str, Any]:
    """eos/bos/pad ids of the adapter's tokenizer where the trainer changed them (setup_chat_format moves
    eos to <|im_end|>): config.json and generation_config.json must stop where the tokenizer does."""
    if tokenizer_dir == base_dir:
        return {}
    ids = special_token_ids(tokenizer_dir)
    changes: dict[str, Any] = {}
    for role, token_id in ids.items():
        key = f"{role}_token_id"
        current = base_config.get(key)
        current_ids = current if isinstance(current, list) else [current]
        if current is not None and token_id is not None and token_id not in current_ids:
            changes[key] = token_id
    return changes
