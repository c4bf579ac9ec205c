"""The coverage ledger: where every adapter tensor went, and proof that every targeted tensor changed.

Planning records, per adapter, which base tensors each of its modules (or full tensors) lands in and which of
its tensors change nothing by design (the base's own copy saved beside a trained one, training-only state).
Writing then checks every targeted tensor: one that comes out equal to the base although its update is
non-zero is an error, never a silent fall-back to the base weight. An adapter tensor that matches no base
tensor gets a diagnosis naming the likely cause (another transformers version's layout, another architecture,
another size) rather than a bare "different base".
"""

from __future__ import annotations

import re
from typing import Any

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.merge import lora_layout
from exporter.merge.experts import describe_layouts, is_fused_module, unwrapped
from exporter.merge.updates import (
    AdapterCoverage,
    AddUpdate,
    ExpertsLoraUpdate,
    KasaUpdate,
    LoraUpdate,
    MergePlan,
    Replacement,
    ScaleUpdate,
    TokenRows,
    Update,
)

_INDEX = re.compile(r"\.\d+\.")


def update_changes(update: Update, base: torch.Tensor) -> bool:
    """Whether the update, applied alone to the float32 base tensor, changes it."""
    if isinstance(update, LoraUpdate):
        return update.scale != 0 and bool(torch.count_nonzero(update.delta()))
    if isinstance(update, ExpertsLoraUpdate):
        return update.scale != 0 and bool(torch.count_nonzero(torch.bmm(update.lora_b, update.lora_a)))
    if isinstance(update, Replacement):
        return not torch.equal(update.tensor.float(), base)
    if isinstance(update, ScaleUpdate):
        return bool(torch.count_nonzero(update.vector.float() - 1))
    if isinstance(update, AddUpdate):
        return update.scale != 0 and bool(torch.count_nonzero(update.vector))
    if isinstance(update, TokenRows):
        inside = bool(update.indices.numel()) and int(update.indices.max()) < base.shape[0]
        return not inside or not torch.equal(base[update.indices], update.rows.float())
    return isinstance(update, KasaUpdate)


def unchanged_target_error(
    name: str, updates: list[Update], base: torch.Tensor, dtype: torch.dtype
) -> Exception:
    """The error for a targeted tensor written equal to the base although an update to it is non-zero."""
    merged = base.clone()
    for update in updates:
        merged = update.apply(merged)
    largest = float((merged - base).abs().max()) if merged.numel() else 0.0
    if largest > 0:
        return InputError(
            f"The adapter's update to {name} is non-zero (largest |ΔW| {largest:.3g}) but smaller than "
            f"{str(dtype).removeprefix('torch.')}'s precision at those weights, so the merged tensor equals the "
            "base's and that part of the fine-tune is lost. Pass --dtype float32 to keep it, or check the adapter's "
            "scaling (lora_alpha, r). Nothing was written."
        )
    return RuntimeError(  # not an ExportError: the CLI reports it as an internal error (exit 4)
        f"The merge left {name} equal to the base although the adapter's update to it is non-zero. This is a "
        "bug in edge-export's merge; nothing was written."
    )


def missing_target_error(
    adapter: LoraAdapter, target: str, base_shapes: dict[str, tuple[int, ...]], model_type: str | None
) -> InputError:
    """Why an adapter tensor matches no base tensor, as precisely as the names tell."""
    module = target.rsplit(".", 1)[0]
    base = f"the base ({model_type or 'unknown model_type'})"
    if is_fused_module(module):
        return InputError(
            f"{adapter.weights} trains {unwrapped(module)} as fused expert parameters (PEFT target_parameters on "
            f"transformers 5's fused mixture-of-experts layers), but edge-export knows how experts are stored on "
            f"disk only for model types {describe_layouts()}, and {base} is not among them or does not have this "
            "layer. Pass the base the adapter was trained on, or merge with PEFT's merge_and_unload under "
            "transformers 5 and export the merged folder."
        )
    fused_in_base = any(
        name.endswith((".experts.gate_up_proj", ".experts.down_proj")) for name in base_shapes
    )
    if re.search(r"\.experts\.\d+\.", target) and fused_in_base:
        return InputError(
            f"{adapter.weights} changes {target}, one expert's own weight (the per-expert layout of transformers 4), "
            f"but {base} stores its experts fused in 3-D tensors. Train the adapter with target_parameters on the "
            "fused experts, or merge with PEFT's merge_and_unload."
        )
    layers = {int(m.group(1)) for n in base_shapes if (m := re.search(r"\.layers\.(\d+)\.", n))}
    index = re.search(r"\.layers\.(\d+)\.", target)
    if index and layers and int(index.group(1)) > max(layers):
        return InputError(
            f"{adapter.weights} changes {target}, in layer {index.group(1)}, but {base} has {max(layers) + 1} "
            "layers: the adapter was trained for a larger model. Pass the base it was trained on."
        )
    leaf = target.rsplit(".", 2)[-2] if target.count(".") >= 1 else target
    similar = sorted({_INDEX.sub(".N.", n) for n in base_shapes if f".{leaf}." in n})
    if similar:
        return InputError(
            f"{adapter.weights} changes {target}, which {base} does not have; it stores {leaf} as "
            f"{similar[0]}. The adapter names its modules as another architecture or another transformers version "
            "does: pass the base it was trained on, or re-save the adapter with the PEFT and transformers releases "
            "that load this base."
        )
    return InputError(
        f"{adapter.weights} changes {target}, which {base} does not have, nor any {leaf} layer: the adapter was "
        "trained for another architecture. Pass the matching --base."
    )


class CoverageCheck:
    """Checks, while the merge writes, that every targeted tensor came out changed (or had nothing to change)."""

    def __init__(self, updates: dict[str, list[Update]], coverage: list[AdapterCoverage]):
        self.updates = updates
        self.coverage = coverage
        self.written: set[str] = set()
        self.unchanged: list[str] = []  # targeted tensors whose updates are all zero (an untrained adapter)

    def check(self, name: str, base: torch.Tensor, written: torch.Tensor) -> None:
        """`base` as read, `written` the merged tensor as written."""
        self.written.add(name)
        if not torch.equal(written, base.to(written.dtype)):
            return
        base32 = base.float()
        updates = self.updates[name]
        if any(update_changes(update, base32) for update in updates):
            raise unchanged_target_error(name, updates, base32, written.dtype)
        self.unchanged.append(name)

    def ledger(self) -> dict[str, Any]:
        """The ledger the manifest keeps; raises if a planned target or an adapter tensor went missing."""
        missing = sorted(set(self.updates) - self.written)
        if missing:
            raise RuntimeError(
                f"The merge planned updates to {', '.join(missing[:5])} but never wrote them. This is a bug in "
                "edge-export's merge; nothing was written."
            )
        for adapter in self.coverage:
            adapter.check_complete()
        targeted = len(self.updates)
        merged = targeted - len(self.unchanged)
        summary = f"merged {merged} of {targeted} targeted tensors"
        if self.unchanged:
            summary += f" ({len(self.unchanged)} left as in the base: the adapter's update to them is zero)"
        return {
            "summary": summary,
            "targeted_tensors": targeted,
            "merged_tensors": merged,
            "zero_updates": sorted(self.unchanged),
            "adapters": [adapter.to_json() for adapter in self.coverage],
        }


def shape_error(adapter: LoraAdapter, what: str, target: str, base_shape: tuple[int, ...]) -> InputError:
    what += lora_layout.block_diagonal_hint(adapter.config, adapter.path / ADAPTER_CONFIG)
    return InputError(
        f"{adapter.weights}: {what}, which does not fit the base tensor {target} {base_shape}: the adapter was "
        "trained for a different base (or its config's r / rank_pattern is wrong). Pass the matching --base."
    )


def require_target(
    adapter: LoraAdapter, target: str, base_shapes: dict[str, tuple[int, ...]], plan: MergePlan
) -> tuple[int, ...]:
    if target not in base_shapes:
        raise missing_target_error(adapter, target, base_shapes, plan.model_type)
    return base_shapes[target]
