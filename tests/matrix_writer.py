"""Save a base, a trained LoRA adapter and the unmerged model's log-probs with the installed releases.

Run by tests/test_version_matrix.py under each transformers × PEFT pair (tests/sideenv.py), so every file
is written by the release it stands for:

    python tests/matrix_writer.py OUT TOKENIZER_JSON CHAT_TEMPLATE TRAIN_JSONL EVAL_JSONL

OUT receives base/ (a small Llama with SmolLM2's tokenizer and rope_theta 100000, saved in float16),
adapter/ (LoRA r=8 on every linear layer, trained a few steps, with the trainer's tokenizer beside it),
reference.npz (exporter.quality.reference's reference format: top-64 log-probs per position of the unmerged model,
in float32) and eval.json (the token ids it was computed on, and the versions that wrote everything).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from converters.metrics import compare_logits, log_softmax, reference_rows
from tests.tiny import TINY_SMOLLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 12
WINDOW = 64


def chat_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])[:WINDOW]


def main(out: Path, tokenizer_file: Path, template: Path, train: Path, evaluation: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = template.read_text()
    config = LlamaConfig(**{**TINY_SMOLLM, "vocab_size": len(tokenizer)})
    base_dir, adapter_dir = out / "base", out / "adapter"
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(STEPS):
        ids = torch.tensor([chat_ids(tokenizer, rows[step % len(rows)]["messages"])])
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)  # trainers save their tokenizer beside the adapter
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))

    # The reference from the saved files, as a user of these releases would load them.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    chats = [json.loads(line) for line in evaluation.read_text().splitlines() if line.strip()][:4]
    sequences = [chat_ids(tokenizer, chat["messages"]) for chat in chats]
    parts: dict[str, list[np.ndarray]] = {"idx": [], "lp": [], "nll": []}
    base_kld = []  # how far the adapter moved the model: KLD of the base from the unmerged model
    with torch.no_grad():
        for sequence in sequences:
            ids = np.asarray(sequence)
            logits = unmerged(input_ids=torch.tensor([sequence])).logits[0].float().numpy()
            rows = reference_rows(log_softmax(logits), ids)
            for key, value in rows.items():
                parts[key].append(value)
            with unmerged.disable_adapter():
                base_logits = unmerged(input_ids=torch.tensor([sequence])).logits[0].float().numpy()
            base_kld.append(compare_logits(base_logits, ids, rows["idx"], rows["lp"])["kld"])
    np.savez(out / "reference.npz", **{key: np.concatenate(values) for key, values in parts.items()})
    (out / "eval.json").write_text(
        json.dumps(
            {
                "sequences": sequences,
                "loss": float(loss),
                "base_mean_kld": float(np.concatenate(base_kld).mean()),
                "versions": {"transformers": transformers.__version__, "peft": peft.__version__},
            }
        )
    )


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:6]))
