"""PEFT's conventions for a LoRA's matrices: the scaling of each module, the orientation a weight is
stored in (Conv1D), and BD-LoRA's packed block-diagonal factors."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

# Model types whose layers are transformers' Conv1D, which stores weights as (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


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


def stored_transposed(
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


def unpack_block_diagonal(
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


def block_diagonal_hint(config: dict[str, Any], config_file: Path) -> str:
    """What a BD-LoRA's shape mismatch most likely means (empty for other adapters)."""
    bdlora = config.get("use_bdlora")
    if not bdlora:
        return ""
    blocks = bdlora.get("nblocks") or 1
    return (
        f" (BD-LoRA with use_bdlora.nblocks = {blocks} in {config_file}: a packed block-diagonal A is "
        f"r × in/{blocks}, a packed B out × r/{blocks}, so the saved shapes were written with another nblocks or r)"
    )
