"""A bitsandbytes 4-bit base with no 16-bit weights (--dequantize-base), unpacked into the 16-bit folder it
stands for, by bitsandbytes' own dequantize_4bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError
from exporter.inputs.base_config import read_base_config


def unpack_four_bit_base(base_dir: Path, target: Path) -> dict[str, Any]:
    """The 16-bit folder a bitsandbytes 4-bit model stands for: every packed weight dequantized by
    bitsandbytes (dequantize_4bit with the quant state saved beside it, as Linear4bit does in training)
    into the dtype it was quantized from, every other tensor and file as it is, the quantization_config
    dropped from config.json. Returns counts for the record."""
    import bitsandbytes.functional as bnb
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from exporter.inputs.safetensors_header import base_shard_files

    target.mkdir(parents=True)
    shards = base_shard_files(base_dir)
    for item in base_dir.iterdir():
        if item.is_file() and item not in shards and not item.name.endswith(".safetensors.index.json"):
            shutil.copyfile(item, target / item.name)
    config = read_base_config(base_dir)
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    holder: dict[str, Path] = {}  # tensor name -> its shard (a weight's quant state may sit in another)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            holder.update(dict.fromkeys(f.keys(), shard))
    packed = {n.split(".quant_state.")[0] for n in holder if ".quant_state.bitsandbytes__" in n}
    state_parts = {
        n for n in holder for w in [n.rsplit(".", 1)[0].removesuffix(".quant_state")] if w in packed
    }

    def read(name: str) -> Any:
        with safe_open(str(holder[name]), "pt") as f:
            return f.get_tensor(name)

    unpacked = 0
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors = {}
        for name in [n for n, s in holder.items() if s == shard and n not in state_parts]:
            tensor = read(name)
            if name in packed:
                parts = {p[len(name) + 1 :]: read(p) for p in state_parts if p.startswith(name + ".")}
                state = bnb.QuantState.from_dict(parts, device=torch.device("cpu"))
                tensor = bnb.dequantize_4bit(tensor, state).contiguous()
                unpacked += 1
            tensors[name] = tensor
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if unpacked == 0:
        raise InputError(
            f"{base_dir}'s config.json says it is a bitsandbytes 4-bit model, but its safetensors hold no packed "
            "4-bit weight (no '.quant_state.bitsandbytes__nf4/fp4' entries). Pass the 16-bit base with --base."
        )
    return {"unpacked_weights": unpacked}
