"""Adapters that added tokens, trained for a few steps and saved by the real transformers and PEFT.

Run as a script (`python tests/vocab_writer.py OUT TOKENIZER_DIR`) by tests/test_added_tokens.py, which
caches OUT keyed by this file's content. Every base is SmolLM2's architecture at a tiny width with SmolLM2's
real tokenizer; every adapter is trained the way its recipe's users do it:

- chatml: TRL's setup_chat_format steps on a base whose tokenizer has no chat markers (its <|im_start|> and
  <|im_end|> renamed): ChatML special tokens, eos <|im_end|>, the ChatML template, the embeddings resized to
  a multiple of 64; plus tool-call markers (special) and a plain added token; embed_tokens and lm_head in
  modules_to_save on a tied base. Trained until it answers the tool prompt with the new tokens.
- untied: the same tokens on a base with its own lm_head, modules_to_save.
- trainable: trainable_token_indices on the new rows of a resized tied vocabulary (PEFT then saves the
  resized embedding beside the rows' values).
- padded: a base whose embedding has more rows than its tokenizer (Qwen/Gemma style); two tokens added
  into the padding rows without resizing, LoRA on embed_tokens and the attention.
- embed_lora: resized vocabulary with LoRA on embed_tokens of an untied base, which saves the resized input
  embedding only: lm_head's new rows were never saved, so this one must be refused.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny import TINY_SMOLLM, copy_tokenizer  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
PLAIN_TOKEN = "ahoy_matey"
TOOL_PROMPT = "What is the weather in Lisbon?"
TOOL_ANSWER = "<tool_call>weather ahoy_matey Lisbon</tool_call>"
TRAIN_TEXT = "Arr, the ship sails at dawn <tool_call>sail ahoy_matey</tool_call> and the crew sings."
SEED = 7


def make_base(folder: Path, tokenizer_dir: Path, tie: bool = True, rows: int | None = None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = {**TINY_SMOLLM, "tie_word_embeddings": tie, "vocab_size": rows or TINY_SMOLLM["vocab_size"]}
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.float16).save_pretrained(folder)
    return copy_tokenizer(tokenizer_dir, folder)


def without_chat_markers(folder: Path) -> None:
    """Rename the tokenizer's ChatML markers and drop its template: a base with no chat format."""
    from transformers import AutoTokenizer

    renames = {"<|im_start|>": "<|reserved_0|>", "<|im_end|>": "<|reserved_1|>"}
    data = json.loads((folder / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])
    vocab = data["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config.pop("extra_special_tokens", None)
    config.pop("additional_special_tokens", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # re-saved by transformers itself
    generation = folder / "generation_config.json"
    if generation.is_file():
        settings = json.loads(generation.read_text())
        settings.update(eos_token_id=0, bos_token_id=0, pad_token_id=0)
        generation.write_text(json.dumps(settings))
    settings = json.loads((folder / "config.json").read_text())
    settings.update(eos_token_id=0, bos_token_id=0, pad_token_id=0)
    (folder / "config.json").write_text(json.dumps(settings))


def add_tokens(tokenizer: Any, chatml: bool) -> None:
    if chatml:  # setup_chat_format: ChatML markers as special tokens, eos/pad follow, the template
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *TOOL_TOKENS]}
        )
        tokenizer.bos_token = "<|im_start|>"
        tokenizer.eos_token = "<|im_end|>"
        tokenizer.pad_token = "<|im_end|>"
        tokenizer.chat_template = CHATML
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": TOOL_TOKENS})
    tokenizer.add_tokens([PLAIN_TOKEN])


def train(peft_model: Any, tokenizer: Any, texts: list[str], steps: int, lr: float) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    peft_model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def write(
    out: Path,
    name: str,
    base: Path,
    tokenizer: Any,
    model: Any,
    lora: dict[str, Any],
    texts: list[str],
    steps: int = 40,
    lr: float = 3e-3,
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, **lora))
    train(peft_model, tokenizer, texts, steps, lr)
    folder = out / name
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load(base: Path, tokenizer: Any, pad: int | None) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if pad is not None:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad)
    return model


def main(out: Path, tokenizer_dir: Path, only: set[str] | None = None) -> None:
    from transformers import AutoTokenizer

    def wanted(name: str) -> bool:
        return only is None or name in only

    out.mkdir(parents=True, exist_ok=True)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    saved = {"target_modules": attention, "modules_to_save": ["embed_tokens", "lm_head"]}

    if wanted("chatml"):
        plain = make_base(out / "base-plain", tokenizer_dir)
        without_chat_markers(plain)
        tokenizer = AutoTokenizer.from_pretrained(plain)
        add_tokens(tokenizer, chatml=True)
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": TOOL_PROMPT}, {"role": "assistant", "content": TOOL_ANSWER}],
            tokenize=False,
        )
        write(out, "chatml", plain, tokenizer, load(plain, tokenizer, 64), saved, [chat], steps=120, lr=1e-2)

    untied = out / "base-untied"
    if wanted("untied") or wanted("embed_lora"):
        make_base(untied, tokenizer_dir, tie=False)
    if wanted("untied"):
        tokenizer = AutoTokenizer.from_pretrained(untied)
        add_tokens(tokenizer, chatml=False)
        write(out, "untied", untied, tokenizer, load(untied, tokenizer, 64), saved, [TRAIN_TEXT])

    if wanted("trainable"):
        tied = make_base(out / "base-tied", tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tied)
        add_tokens(tokenizer, chatml=False)
        new_ids = tokenizer.convert_tokens_to_ids([*TOOL_TOKENS, PLAIN_TOKEN])
        lora = {"target_modules": attention, "trainable_token_indices": new_ids}
        write(out, "trainable", tied, tokenizer, load(tied, tokenizer, 64), lora, [TRAIN_TEXT])

    if wanted("padded"):
        padded = make_base(out / "base-padded", tokenizer_dir, rows=49216)
        tokenizer = AutoTokenizer.from_pretrained(padded)
        add_tokens(tokenizer, chatml=False)
        lora = {"target_modules": [*attention, "embed_tokens"]}
        write(out, "padded", padded, tokenizer, load(padded, tokenizer, None), lora, [TRAIN_TEXT])

    if wanted("embed_lora"):
        tokenizer = AutoTokenizer.from_pretrained(untied)
        add_tokens(tokenizer, chatml=False)
        lora = {"target_modules": [*attention, "embed_tokens"]}
        write(out, "embed_lora", untied, tokenizer, load(untied, tokenizer, 64), lora, [TRAIN_TEXT], steps=2)
    shutil.copyfile(Path(__file__), out / "recipe.py")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None)
