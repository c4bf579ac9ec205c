"""A real TRL output folder: TRL 1.16's SFTTrainer (conversational data, LoRA on every linear layer,
assistant-only loss through the template's {% generation %} markers, a checkpoint every 2 steps,
`trainer.save_model`) on the demo base, built once per recipe and cached outside the checkout
(EDGE_EXPORT_TEST_CACHE)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.sideenv import trained_run

# SmolLM2's ChatML with the markers TRL's assistant_only_loss needs around each assistant turn.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RECIPE = {
    "trl": "1.16.0",
    "rows": 16,
    "max_steps": 4,
    "save_steps": 2,
    "r": 8,
    "lora_alpha": 16,
    "learning_rate": 5e-3,
    "template": hashlib.sha256(GENERATION_TEMPLATE.encode()).hexdigest()[:16],
}


def trl_output(base: Path) -> Path:
    """<cache>/trl-<key>/: the output_dir of the run (final adapter, tokenizer, training_args.bin,
    checkpoint-2/, checkpoint-4/)."""
    return trained_run("trl", base, RECIPE, lambda staging, _: train(base, staging))


def train(base: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from demos.inputs import read_jsonl

    rows = [{"messages": row["messages"]} for row in read_jsonl("demo_train.jsonl")[: RECIPE["rows"]]]
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=RECIPE["max_steps"],
        save_steps=RECIPE["save_steps"],
        per_device_train_batch_size=4,
        learning_rate=RECIPE["learning_rate"],
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=256,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        assistant_only_loss=True,
    )
    peft_config = LoraConfig(
        r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(out))
