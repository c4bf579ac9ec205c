"""Mixture-of-experts layers that transformers 5 fuses in memory, and how each fused parameter is stored on disk
(the data file data/fused_experts.toml), read without torch."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

_LAYER = re.compile(r"^(.*?\.\d+\.)(.*)$")  # a decoder layer's prefix ("model.layers.3.") and the rest


@dataclass(frozen=True)
class FusedLayout:
    """How one family of architectures fuses its experts in memory and stores them on disk."""

    family: str
    model_types: tuple[str, ...]
    experts: str  # the fused module, relative to a layer
    transposed: bool
    stored: dict[str, tuple[str, ...]]  # fused parameter → stored tensors (relative to a layer), in row order
    renamed: dict[str, str]

    def stored_module(self, module: str) -> str | None:
        """The stored name of a module whose in-memory name differs (Mixtral's mlp → block_sparse_moe)."""
        match = _LAYER.match(module)
        if not match:
            return None
        for memory, disk in self.renamed.items():
            if match.group(2).startswith(memory):
                return match.group(1) + disk + match.group(2).removeprefix(memory)
        return None


@cache
def fused_layouts() -> dict[str, FusedLayout]:
    """Every known layout, by config.json model_type."""
    raw = tomllib.loads(
        resources.files("exporter").joinpath("data/fused_experts.toml").read_text(encoding="utf-8")
    )
    layouts: dict[str, FusedLayout] = {}
    for family, row in raw.items():
        layout = FusedLayout(
            family,
            tuple(row["model_types"]),
            row["experts"],
            bool(row["transposed"]),
            {name: tuple(parts) for name, parts in row["stored"].items()},
            dict(row.get("renamed", {})),
        )
        for model_type in layout.model_types:
            if model_type in layouts:
                raise ValueError(f"fused_experts.toml: model_type {model_type} appears twice")
            layouts[model_type] = layout
    return layouts
