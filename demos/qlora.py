"""A real QLoRA adapter on the demo base, for `make demo-qlora`, the tests and bench/qlora.py.

Trained the way QLoRA scripts do it: transformers' BitsAndBytesConfig (NF4, double quant), PEFT's
prepare_model_for_kbit_training, LoRA on every linear layer, a few steps on CPU (bitsandbytes runs
there); saved by PEFT's save_pretrained. The 4-bit base is saved beside it (transformers serializes
bitsandbytes weights), and the adapter's base_model_name_or_path names that 4-bit folder, as it does
when a script trains on a pre-quantized base.

    python -m demos.qlora --out .cache/demo    # builds .cache/demo/qlora/{adapter,base-4bit}

Built once and reused while the recipe and the demo base are unchanged.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

RECIPE: dict[str, Any] = {
    "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0},
    "steps": 4,
    "batch": 4,
    "lr": 3e-3,
    "seed": 0,
    "data": "demo_train.jsonl",
    "versions": {"bitsandbytes": "0.50.2", "peft": "0.21.2", "transformers": "5.23.0"},
    "version": 1,
}
ADAPTER = "adapter"
BASE_4BIT = "base-4bit"


def recipe_key(base: Path) -> str:
    """The recipe and the demo base's weights: what the adapter's bytes depend on."""
    weights = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps({**RECIPE, "base": weights}, sort_keys=True).encode()).hexdigest()[:16]


def build_qlora_demo(base: Path, target: Path) -> Path:
    """`target`/{adapter, base-4bit}, trained unless a build of the same recipe is there."""
    key = recipe_key(base)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = target / "recipe.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()).get("key") == key):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                train_qlora(base, staging)
                (staging / "recipe.json").write_text(json.dumps({"key": key, **RECIPE}, indent=2) + "\n")
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        # The adapter records the 4-bit base it was trained on, by its path here (unknown while staging).
        config_file = target / ADAPTER / "adapter_config.json"
        config = json.loads(config_file.read_text())
        if config.get("base_model_name_or_path") != str(target / BASE_4BIT):
            config["base_model_name_or_path"] = str(target / BASE_4BIT)
            config_file.write_text(json.dumps(config, indent=2))
    return target


def train_qlora(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from demos.inputs import read_jsonl
    from exporter.inputs.dialects import quiet_transformers

    quiet_transformers()
    torch.manual_seed(RECIPE["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = BitsAndBytesConfig(**RECIPE["quantization"])
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(out / BASE_4BIT)
    tokenizer.save_pretrained(out / BASE_4BIT)
    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, LoraConfig(**RECIPE["lora"]))
    rows = read_jsonl(RECIPE["data"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    batch = RECIPE["batch"]
    for step in range(RECIPE["steps"]):
        chats = rows[step * batch : (step + 1) * batch]
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chats]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        loss = peft_model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"QLoRA step {step + 1}/{RECIPE['steps']}: loss {loss.item():.3f}", flush=True)
    peft_model.save_pretrained(str(out / ADAPTER))


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the demo's QLoRA adapter (bitsandbytes NF4 on CPU).")
    parser.add_argument("--out", type=Path, default=Path(".cache/demo"))
    args = parser.parse_args()
    from demos.inputs import build_demo

    base, _ = build_demo(args.out)
    folder = build_qlora_demo(base, args.out / "qlora")
    print(f"QLoRA adapter: {folder / ADAPTER}\n4-bit base it was trained on: {folder / BASE_4BIT}")


if __name__ == "__main__":
    main()
