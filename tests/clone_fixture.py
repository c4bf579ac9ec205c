"""Tokenizers as TRL's `clone_chat_template` leaves them: the base's tokenizer given another family's chat
template, its added tokens (some of them newline and space runs, as Gemma's tokenizer has), its eos, and
`<extra_id_N>` fillers up to the embedding rows (resized to a multiple of 64).

A source tokenizer per family of the template corpus (../shared/ollama-templates) is the demo tokenizer
with that family's template and the tokens it writes, added as the family's tokenizer adds them; the
clone is made by TRL 1.16 itself."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from tests.sideenv import trained_run

TEMPLATES = Path(__file__).resolve().parents[2] / "shared" / "ollama-templates" / "templates.jsonl"
# The literal tokens a family's template writes (role markers, turn ends).
TOKEN = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>|<step>|<start_[a-z]+>|<end_[a-z]+>"
)
# The tokens that end a turn, the first found in a family's template being its eos.
TURN_ENDS = [
    "<|im_end|>",
    "<|eot_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|end_of_turn|>",
    "<|EOT|>",
    "<end_message>",
]
# Gemma's tokenizer lists newline, space and tab runs and HTML tags as (not special) added tokens.
GEMMA_PLAIN = [
    *("\n" * n for n in range(2, 32)),
    *(" " * n for n in range(2, 32)),
    *("\t" * n for n in range(2, 32)),
    "<table>",
    "<tr>",
    "<td>",
    "<h1>",
    "</h1>",
]


def family_templates() -> dict[str, str]:
    """The first template of each family in the corpus."""
    families: dict[str, str] = {}
    for line in TEMPLATES.read_text(encoding="utf-8").splitlines():
        family, template = next(iter(json.loads(line).items()))
        families.setdefault(family, template)
    return families


def source_tokenizer(family: str, template: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tokenizer of `family` to clone from: the demo tokenizer with the family's template and tokens."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    written = sorted(set(TOKEN.findall(template)))
    eos = next((t for t in TURN_ENDS if t in written), "</s>")
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in [*written, eos]])
    if family.startswith("gemma"):
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in GEMMA_PLAIN])
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


def clone(model: Any, tokenizer_dir: Path, source: Path) -> tuple[Any, Any, list[int]]:
    """TRL's clone_chat_template onto `model` and the tokenizer in `tokenizer_dir`."""
    from transformers import AutoTokenizer
    from trl import clone_chat_template

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model, tokenizer, added = clone_chat_template(model, tokenizer, str(source))
    return model, tokenizer, list(added)


def cloned_folder(base: Path, family: str, template: str, work: Path) -> Path:
    """`base` (a model folder with the demo tokenizer) after clone_chat_template from `family`, saved as a
    model folder: its config, weights and the grown tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    source = source_tokenizer(family, template, base, work / "source")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model, tokenizer, _ = clone(model, base, source)
    model.save_pretrained(work / "cloned")
    tokenizer.save_pretrained(work / "cloned")
    return work / "cloned"


# The fine-tune of a cloned model, as TRL's documentation gives it: LoRA on every linear layer and the
# added tokens' embedding rows trainable (trainable_token_indices), saved by SFTTrainer. The base's head is
# untied: TRL 1.16's fused LM head reads lm_head.bias, which PEFT's wrapper of a tied head lacks.
TRAIN_RECIPE = {"trl": "1.16.0", "family": "gemma-instruct", "rows": 12, "max_steps": 3, "r": 8, "lr": 5e-3}


def trained_clone(base: Path) -> Path:
    """<cache>/clone-<key>/: SFTTrainer's output_dir after clone_chat_template from the Gemma-like source
    onto `base` (adapter with the resized embeddings, the grown tokenizer, Gemma's template)."""
    recipe = {**TRAIN_RECIPE, "tokens": GEMMA_PLAIN, "pattern": TOKEN.pattern}
    return trained_run("clone", base, recipe, lambda staging, _: _train_clone(base, staging))


def _train_clone(base: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from demos.inputs import read_jsonl

    family = str(TRAIN_RECIPE["family"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        source = source_tokenizer(family, family_templates()[family], base, Path(scratch))
        model, tokenizer, added = clone(model, base, source)
    rows = [
        {"messages": [m for m in row["messages"] if m["role"] != "system"]}
        for row in read_jsonl("demo_train.jsonl")[: int(TRAIN_RECIPE["rows"])]
    ]
    args = SFTConfig(
        output_dir=str(out),
        max_steps=int(TRAIN_RECIPE["max_steps"]),
        per_device_train_batch_size=4,
        learning_rate=float(TRAIN_RECIPE["lr"]),
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=128,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=int(TRAIN_RECIPE["r"]),
        lora_alpha=16,
        target_modules="all-linear",
        trainable_token_indices=added,
        task_type="CAUSAL_LM",
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
