"""Tiny real models and real PEFT adapters for unit tests (built in seconds, saved like the real thing)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def copy_tokenizer(source: Path, target: Path) -> Path:
    """Copy the tokenizer files `source` has (transformers 4 and 5 write different sets)."""
    from exporter.merge import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    return target


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


# SmolLM2's shape, shrunk: its vocabulary, its rope_theta (not the default 10000) and its tied
# embeddings. A wide initialisation makes attention peaked, so that a misread rope shows in the logits.
TINY_SMOLLM = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "initializer_range": 0.15,
}


def make_tiny_smollm(
    folder: Path, tokenizer_dir: Path, dtype: torch.dtype = torch.float16, seed: int = 0, tie: bool = True
) -> Path:
    """SmolLM2's architecture, tokenizer and rope_theta at a tiny width: converts, quantizes and evaluates
    in seconds through the real pipeline. `tokenizer_dir` is the demo base (its tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY_SMOLLM, "tie_word_embeddings": tie})).to(dtype).save_pretrained(
        folder, safe_serialization=True
    )
    return copy_tokenizer(tokenizer_dir, folder)


def make_tiny_gpt2(folder: Path, hidden: int = 64, vocab: int = 256, seed: int = 0) -> Path:
    """GPT-2 stores its projections as Conv1D (in × out): the fan_in_fan_out case, with biases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128)
    model = GPT2LMHeadModel(config).to(torch.float16)
    with torch.no_grad():  # GPT-2 initialises biases to zero; make them matter
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_adapter(
    base: Path,
    folder: Path,
    seed: int = 1,
    perturb: bool = False,
    fill_lora: bool = False,
    **lora_kwargs: Any,
) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B, saved with save_pretrained.

    perturb=True also changes every other trainable tensor (DoRA magnitudes, LoRA biases,
    modules_to_save copies, trained biases), which PEFT initialises to values that change nothing.
    fill_lora=True redraws every lora_A/lora_B weight (for variants whose B starts at zero even with
    init_lora_weights=False, such as BD-LoRA's block-diagonal B).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    options.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**options))
    _perturb(peft_model, perturb)
    if fill_lora:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    parameter.copy_(0.3 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def make_ia3_adapter(
    base: Path,
    folder: Path,
    target_modules: list[str],
    feedforward_modules: list[str],
    seed: int = 1,
    **kwargs: Any,
) -> Path:
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model, IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules, **kwargs)
    )
    _perturb(peft_model, True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def _perturb(peft_model: Any, everything: bool) -> None:
    if not everything:
        return
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if (
                not parameter.requires_grad
                or ".lora_A." in name
                or ".lora_B.weight" in name.replace("default.", "")
            ):
                continue
            parameter.mul_(1 + 0.3 * torch.randn_like(parameter)).add_(0.02 * torch.randn_like(parameter))
