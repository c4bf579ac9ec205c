"""Save a tiny Qwen3-MoE and a LoRA trained on its experts one by one, as transformers 4 does it.

Run by tests/test_arch_matrix.py under transformers 4.57 + PEFT 0.21 (tests/sideenv.py): transformers 4
keeps each expert an nn.Linear, so PEFT's "all-linear" trains mlp.experts.N.gate_proj/up_proj/down_proj
and the router (mlp.gate) as separate LoRA modules, the layout transformers 5 no longer has in memory.

    python tests/per_expert_writer.py OUT TOKENIZER_JSON CHAT_TEMPLATE TRAIN_JSONL

OUT receives base/ (saved in float16 with SmolLM2's tokenizer) and adapter/ (r=8, ten steps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

STEPS = 10
WINDOW = 64


def main(out: Path, tokenizer_file: Path, template: Path, train: Path) -> None:
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = template.read_text()
    config = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        vocab_size=len(tokenizer),
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,  # as real Qwen3-MoE checkpoints (llama.cpp normalises the top-k weights)
    )
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", torch_dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(STEPS):
        text = tokenizer.apply_chat_template(rows[step % len(rows)]["messages"], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:WINDOW]])
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(out / "adapter"))
    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    (out / "written.json").write_text(json.dumps(versions) + "\n")


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:5]))
