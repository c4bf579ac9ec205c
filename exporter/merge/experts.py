"""LoRA on transformers 5's fused mixture-of-experts parameters (PEFT `target_parameters`), mapped onto the
tensors the base stores on disk.

transformers 5 holds a layer's experts as 3-D parameters, `gate_up_proj` and `down_proj`, but saves them as the
checkpoint has them: one tensor per expert and projection (Qwen-MoE, Mixtral), or fused (gpt-oss). PEFT's
ParamWrapper (peft/tuners/lora/layer.py) trains such a parameter of shape (E, d1, d2) with one
lora_A (r·E × in) and one lora_B (out × r·E); expert e's update is

    ΔW_e = scaling · B[:, e::E] · A[e·r:(e+1)·r]           (out × in)

stored as ΔW_e when the parameter is (E, out, in) and as ΔW_eᵀ when it is (E, in, out) (transformers'
`is_transposed`). Several parameters of one module are wrapped one inside the other, the first one the module
registers innermost, so the adapter saves `<experts>.base_layer.lora_A` for gate_up_proj and `<experts>.lora_A`
for down_proj. A gate_up_proj stored per expert is the concatenation of the gate and up rows, gate first
(transformers' conversion_mapping: MergeModulelist, then Concatenate(dim=1)). The layouts are data:
data/fused_experts.toml.
"""

from __future__ import annotations

from typing import Any

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import ADAPTER_CONFIG, LoraAdapter
from exporter.inputs.fused_experts import FusedLayout, fused_layouts
from exporter.merge.lora_layout import lora_scale
from exporter.merge.updates import ExpertsLoraUpdate, LoraUpdate, MergePlan

BASE_LAYER = ".base_layer"


def unwrapped(module: str) -> str:
    """A module's name without PEFT's nested `.base_layer` parts."""
    return module.replace(BASE_LAYER, "")


def is_fused_module(module: str) -> bool:
    """Whether a LoRA module name is a fused experts module (PEFT target_parameters)."""
    return BASE_LAYER in module or unwrapped(module).endswith(".experts")


def plan_fused_experts(
    adapter: LoraAdapter,
    layout: FusedLayout,
    wrappers: dict[str, dict[str, torch.Tensor]],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> dict[str, list[str]]:
    """Plan every fused experts module's updates; returns each adapter module's stored targets.

    `wrappers` maps the adapter's module names (`….experts`, `….experts.base_layer`, …) to their LoRA parts.
    """
    by_module: dict[str, dict[int, str]] = {}
    for name in wrappers:
        by_module.setdefault(unwrapped(name), {})[name.count(BASE_LAYER)] = name
    placed: dict[str, list[str]] = {}
    for module, depths in sorted(by_module.items()):
        parameters = _targeted_parameters(adapter, layout, module, len(depths))
        for depth, name in depths.items():
            parameter = parameters[len(depths) - 1 - depth]  # the innermost wrapper is the first parameter
            placed[name] = _plan_parameter(
                adapter, layout, module, parameter, wrappers[name], base_shapes, plan
            )
    return placed


def _targeted_parameters(adapter: LoraAdapter, layout: FusedLayout, module: str, wrapped: int) -> list[str]:
    """The module's parameters the adapter targets, in the order the module registers them (PEFT's nesting)."""
    wanted = [str(t) for t in adapter.config.get("target_parameters") or []]
    where = adapter.path / ADAPTER_CONFIG

    def matches(parameter: str, target: str) -> bool:
        key = f"{module}.{parameter}"
        return key == target or key.endswith(f".{target}")

    known = [p for p in layout.stored if any(matches(p, t) for t in wanted)]
    unknown = [
        t for t in wanted if t.rsplit(".", 1)[-1] not in layout.stored and matches(t.rsplit(".", 1)[-1], t)
    ]
    if unknown:
        raise InputError(
            f"{where} targets {', '.join(unknown)} with target_parameters; edge-export merges the fused "
            f"{' and '.join(layout.stored)} of {layout.family}-style experts only. Train without it, or merge with "
            "PEFT's merge_and_unload."
        )
    if len(known) != wrapped:
        raise InputError(
            f"{adapter.weights} holds {wrapped} LoRA wrapper(s) on {module}, but {where}'s target_parameters "
            f"({', '.join(wanted) or 'none'}) name {len(known)} of its parameters: the config and the weights do "
            "not belong together. Re-save the adapter with PEFT."
        )
    return known


def _plan_parameter(
    adapter: LoraAdapter,
    layout: FusedLayout,
    module: str,
    parameter: str,
    parts: dict[str, torch.Tensor],
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> list[str]:
    if "lora_A" not in parts or "lora_B" not in parts or len(parts) != 2:
        raise InputError(
            f"{adapter.weights}: the fused experts {module}.{parameter} need exactly lora_A and lora_B (PEFT's "
            f"ParamWrapper trains nothing else); found {', '.join(sorted(parts))}."
        )
    layer = module.removesuffix(layout.experts)
    stored = [layer + name for name in layout.stored[parameter]]
    lora_a, lora_b = parts["lora_A"].float(), parts["lora_B"].float()
    rank, scaling = lora_scale(adapter.config, f"{module}.{parameter}")
    scale = adapter.weight * scaling
    if len(stored) == 1 and "{expert}" not in stored[0]:
        return _plan_stored_fused(adapter, layout, stored[0], lora_a, lora_b, rank, scale, base_shapes, plan)
    experts = _count_experts(stored[0], base_shapes)
    shapes = [base_shapes.get(name.format(expert=0)) for name in stored]
    if not experts or any(s is None or len(s) != 2 for s in shapes):
        raise InputError(
            f"{adapter.weights} trains the fused experts {module}.{parameter}, stored as "
            f"{', '.join(n.format(expert=0) for n in stored)} in {layout.family}-style models, but the base has no "
            "such tensors: the adapter was trained for another architecture. Pass the matching --base."
        )
    rows = [s[0] for s in shapes if s is not None]
    in_dim, out_dim = shapes[0][1] if shapes[0] else 0, sum(rows)
    _check_factors(adapter, module, parameter, lora_a, lora_b, rank, experts, in_dim, out_dim)
    targets: list[str] = []
    for expert in range(experts):
        a = lora_a[expert * rank : (expert + 1) * rank].contiguous()
        b = lora_b[:, expert::experts]
        offset = 0
        for name, count in zip(stored, rows, strict=True):
            target = name.format(expert=expert)
            if base_shapes.get(target) != (count, in_dim):
                raise InputError(
                    f"{adapter.weights}: {module}.{parameter} maps expert {expert} to {target} ({count}, {in_dim}), "
                    f"but the base has {base_shapes.get(target)}: the adapter was trained for another base."
                )
            plan.add(target, LoraUpdate(a, b[offset : offset + count].contiguous(), scale))
            targets.append(target)
            offset += count
    return targets


def _plan_stored_fused(
    adapter: LoraAdapter,
    layout: FusedLayout,
    target: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rank: int,
    scale: float,
    base_shapes: dict[str, tuple[int, ...]],
    plan: MergePlan,
) -> list[str]:
    shape = base_shapes.get(target)
    if shape is None or len(shape) != 3:
        raise InputError(
            f"{adapter.weights} trains the fused experts {target}, which {layout.family}-style models store as one "
            f"3-D tensor, but the base has {shape or 'no such tensor'}: the adapter was trained for another "
            "architecture. Pass the matching --base."
        )
    experts, first, second = shape
    in_dim, out_dim = (first, second) if layout.transposed else (second, first)
    module, parameter = target.rsplit(".", 1)
    _check_factors(adapter, module, parameter, lora_a, lora_b, rank, experts, in_dim, out_dim)
    a = lora_a.reshape(experts, rank, in_dim)
    b = lora_b.reshape(out_dim, rank, experts).permute(2, 0, 1).contiguous()
    plan.add(target, ExpertsLoraUpdate(a, b, scale, layout.transposed))
    return [target]


def _count_experts(template: str, base_shapes: dict[str, tuple[int, ...]]) -> int:
    count = 0
    while template.format(expert=count) in base_shapes:
        count += 1
    return count


def _check_factors(
    adapter: LoraAdapter,
    module: str,
    parameter: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rank: int,
    experts: int,
    in_dim: int,
    out_dim: int,
) -> None:
    expected_a, expected_b = (rank * experts, in_dim), (out_dim, rank * experts)
    if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
        raise InputError(
            f"{adapter.weights}: the fused experts {module}.{parameter} have lora_A {tuple(lora_a.shape)} and "
            f"lora_B {tuple(lora_b.shape)}; {experts} experts of ({out_dim} × {in_dim}) at rank {rank} need "
            f"{expected_a} and {expected_b}: the adapter was trained for a different base (or its config's r / "
            "rank_pattern is wrong). Pass the matching --base."
        )


def describe_layouts() -> str:
    return ", ".join(sorted(fused_layouts()))


def layout_for(base_config: dict[str, Any]) -> FusedLayout | None:
    return fused_layouts().get(str(base_config.get("model_type", "")))
