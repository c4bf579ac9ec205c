"""A model whose rows are multiples of 256, so that llama.cpp's k-quants apply to every tensor (SmolLM2-135M's
576-wide rows fall back to 32-block types), with a LoRA trained on it: the fit search's test body.

It is the demo base cut down, not random weights: its first 8 layers, its first 512 hidden features, 8 query
heads and 2 key/value heads of 64, its real vocabulary (the embedding holds half the weights, as in a small
model with a large vocabulary). The demo's pirate LoRA recipe then trains on it (demos.inputs.train_adapter).
Built once per recipe into the test cache (tests.sideenv.trained_run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.sideenv import trained_run

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 8, 8, 2, 64
RECIPE = {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "version": 1}


def fit_body(demo_base: Path) -> tuple[Path, Path]:
    """(base, adapter): the cut-down demo base and a LoRA trained on it."""

    def build(staging: Path, target: Path) -> None:
        base = staging / "base"
        _cut(demo_base, base)
        from demos.inputs import train_adapter

        # train_adapter records the base's path: train against the final place, then move the adapter in
        final_base = target / "base"
        adapter = staging / "adapter"
        train_adapter(base, adapter)
        config_file = adapter / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(final_base)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    folder = trained_run("fit-body", demo_base, RECIPE, build)
    return folder / "base", folder / "adapter"


def _cut(demo_base: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    tensors = load_file(str(demo_base / "model.safetensors"))
    cut = {}
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer >= LAYERS:
                continue
        if name.endswith(("q_proj.weight",)):
            value = tensor[:q_rows, :HIDDEN]
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            value = tensor[:kv_rows, :HIDDEN]
        elif name.endswith("o_proj.weight"):
            value = tensor[:HIDDEN, :q_rows]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            value = tensor[:, :HIDDEN]
        elif name.endswith("down_proj.weight"):
            value = tensor[:HIDDEN, :]
        elif name.endswith("embed_tokens.weight"):
            value = tensor[:, :HIDDEN]
        else:  # norms
            value = tensor[:HIDDEN]
        cut[name] = value.contiguous()
    save_file(cut, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((demo_base / "config.json").read_text())
    config.update(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS
    )
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in demo_base.iterdir():
        if item.name not in ("model.safetensors", "config.json") and item.is_file():
            shutil.copyfile(item, target / item.name)
