"""Tiny real models and real PEFT adapters for unit tests (built in seconds, saved like the real thing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tiny_llama(
    folder: Path,
    hidden: int = 64,
    vocab: int = 256,
    layers: int = 2,
    seed: int = 0,
    tie: bool = True,
    dtype: torch.dtype = torch.float16,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 1, **lora_kwargs: Any) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    options.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
