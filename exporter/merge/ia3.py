"""IA3 adapters: learned vectors that rescale a weight's rows (attention) or columns (feed-forward)."""

from __future__ import annotations

import re

import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import LoraAdapter
from exporter.merge.coverage import require_target, shape_error
from exporter.merge.updates import MergePlan, ScaleUpdate


def plan_ia3(
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
        shape = require_target(adapter, target, base_shapes, plan)
        oriented = vector.T if fan_in_fan_out else vector
        if vector.dim() != 2 or any(v not in (1, s) for v, s in zip(oriented.shape, shape, strict=True)):
            raise shape_error(adapter, f"{module} has an IA3 vector of {tuple(vector.shape)}", target, shape)
        plan.add(target, ScaleUpdate(oriented))
        targets = [target]
        feedforward = vector.shape[0] == 1 and vector.shape[1] != 1
        if not feedforward and f"{module}.bias" in base_shapes:
            plan.add(f"{module}.bias", ScaleUpdate(vector.reshape(-1)))
            targets.append(f"{module}.bias")
        plan.coverage[-1].place(name, targets, 1)
