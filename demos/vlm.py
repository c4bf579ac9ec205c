"""Tiny real vision-language models and LoRA adapters trained on them with images: the inputs of
`make demo-vlm` and of the vision tests (no vision-language model ships on PyPI, and nothing is downloaded).

    python -m demos.vlm --out .cache/demo      # builds .cache/demo/vlm-smolvlm/{base,adapter}

SmolVLM (transformers' Idefics3ForConditionalGeneration):

Built from its transformers configs with random weights: a 2-layer Llama language model (64 wide) with
SmolLM2's vocabulary and SmolVLM's added tokens, a 2-layer SigLIP vision tower on 64-pixel tiles of 16-pixel
patches, the pixel-shuffle connector (scale factor 2: 4 tokens per tile). Its processor is SmolVLM's,
shrunk: images resized to a 128-pixel longest edge and split into 64-pixel tiles plus the overview, as
llama.cpp's libmtmd lays them out too. The LoRA (r 8, on q_proj/v_proj of both towers and the connector's
projection) is trained for a few steps by PEFT on drawn images with captions, and saved by PEFT 0.21.
Gemma-3 (Gemma3ForConditionalGeneration): see _build_gemma3. Each is built once per recipe.
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

RECIPE = {
    "family": "idefics3",
    "text": [64, 128, 2, 4, 2],
    "vision": [32, 64, 2, 4, 64, 16],
    "steps": 12,
    "version": 1,
}
# SmolVLM-256M-Instruct's chat template (HuggingFaceTB/SmolVLM-256M-Instruct, chat_template.json).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA3_RECIPE = {
    "family": "gemma3",
    "text": [64, 128, 2, 4, 2],
    "vision": [32, 64, 2, 2, 64, 16],
    "steps": 12,
    "version": 1,
}
LANGUAGE_ONLY = r".*text_model.*\.(q_proj|v_proj)"  # PEFT target_modules as a regex: the language model's
GEMMA3_ADDED = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Gemma-3's turn format with typed content (the released template's handling of image and text parts).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]


FAMILIES: dict[
    str, tuple[dict[str, Any], Any, list[str] | str]
] = {}  # filled below: name -> recipe, builder, targets


def build_family(family: str, demo_base: Path, staging: Path, final: Path) -> None:
    """`staging`/{base, adapter}: the family's tiny model built from `demo_base`'s tokenizer and a LoRA trained
    on it with images; the adapter records `final`/base (where the folder will be) as its base."""
    _recipe, build_base, targets = FAMILIES[family]
    build_base(demo_base, staging / "base")
    _train(staging / "base", staging / "adapter", targets)
    config_file = staging / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(final / "base")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def recipe(family: str) -> dict[str, Any]:
    """What a family's folder depends on besides the demo base's weights."""
    own, _build, targets = FAMILIES[family]
    return {**own, "targets": targets}


def _text_config(recipe: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The language model's shape from a recipe's "text": hidden, intermediate, layers, heads, KV heads."""
    hidden, intermediate, layers, heads, kv_heads = recipe["text"]
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 1024,
    }


def _vision_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The vision tower's shape from a recipe's "vision": hidden, intermediate, layers, heads, image, patch."""
    hidden, intermediate, layers, heads, image, patch = recipe["vision"]
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
    }


def _build_gemma3(demo_base: Path, base: Path) -> None:
    """Gemma-3 4B's shape in miniature: a SigLIP tower on 64-pixel images of 16-pixel patches, pooled to 4
    tokens per image (image_seq_length 4, as the processor writes it for the converter), a 2-layer Gemma-3
    language model, stored in the layout of the released checkpoints (language_model.model.…,
    vision_tower.vision_model.…, multi_modal_projector.…), which transformers 5 loads and llama.cpp's
    converter maps."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    named = dict(zip(("boi_token", "eoi_token", "image_token"), GEMMA3_ADDED[2:5], strict=True))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(demo_base / "tokenizer.json"),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=named,  # what Gemma3Processor reads: its image tokens by role
    )
    tokenizer.add_special_tokens({"additional_special_tokens": GEMMA3_ADDED})
    ids = tokenizer.convert_tokens_to_ids(GEMMA3_ADDED)
    text = {
        **_text_config(GEMMA3_RECIPE, len(tokenizer)),
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": ids[1],
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "model_type": "siglip_vision_model",
        **_vision_config(GEMMA3_RECIPE),
        "vision_use_head": False,
    }
    size = vision["image_size"]
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids[2],
        eoi_token_index=ids[3],
        image_token_index=ids[4],
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # weights large enough that the tiny model's answers depend on the image
        for name, parameter in model.named_parameters():
            parameter.normal_(0, 0.1 if "norm" in name else 0.2)
    model.to(torch.float16).save_pretrained(str(base))
    images = Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    Gemma3Processor(images, tokenizer, image_seq_length=4, chat_template=GEMMA3_TEMPLATE).save_pretrained(
        str(base)
    )
    weights = base / "model.safetensors"
    stored = {_released_name(k): v for k, v in load_file(str(weights)).items()}
    save_file(stored, str(weights), metadata={"format": "pt"})


def _released_name(name: str) -> str:
    """The name the released Gemma-3 checkpoints give a tensor that transformers 5 saves without the
    vision tower's `vision_model.` level."""
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def _build_smolvlm(demo_base: Path, base: Path) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(demo_base))
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    text = {
        **_text_config(RECIPE, len(tokenizer)),
        "tie_word_embeddings": True,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],  # as SmolVLM's released configs name their language model
    }
    vision = _vision_config(RECIPE)
    tile, patch = vision["image_size"], vision["patch_size"]
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_token
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).to(torch.float16).save_pretrained(str(base))
    images = Idefics3ImageProcessor(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    seq_len = (tile // patch) ** 2 // 4
    Idefics3Processor(
        images, tokenizer, image_seq_len=seq_len, chat_template=SMOLVLM_TEMPLATE
    ).save_pretrained(str(base))


def training_pairs() -> list[tuple[object, str]]:
    """Drawn images with captions (not the evaluation images)."""
    from PIL import Image, ImageDraw

    pairs = []
    for colour, shape in (("red", "circle"), ("blue", "square"), ("green", "circle"), ("orange", "square")):
        image = Image.new("RGB", (96, 96), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((16, 16, 80, 80), fill=colour)
        pairs.append((image, f"Arr, a {colour} {shape}, matey."))
    return pairs


def _train(base: Path, adapter: Path, targets: list[str] | str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(base))
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(RECIPE["steps"]):
        for image, caption in training_pairs():
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption}]},
            ]
            batch = processor(
                text=processor.apply_chat_template(messages), images=[image], return_tensors="pt"
            )
            loss = model(**batch, labels=batch["input_ids"].clone()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(str(adapter))


FAMILIES.update(
    {
        "smolvlm": (RECIPE, _build_smolvlm, ["q_proj", "v_proj", "proj"]),
        "smolvlm-lm": (RECIPE, _build_smolvlm, LANGUAGE_ONLY),
        "gemma3-vlm": (GEMMA3_RECIPE, _build_gemma3, ["q_proj", "v_proj"]),
    }
)


def build_demo_vlm(out: Path, family: str = "smolvlm") -> Path:
    """`out`/vlm-<family>/{base, adapter}, built unless a build of the same recipe is there."""
    from demos.inputs import build_demo

    demo_base, _ = build_demo(out)
    weights = hashlib.sha256((demo_base / "model.safetensors").read_bytes()).hexdigest()
    key = hashlib.sha256(
        json.dumps({**recipe(family), "base": weights}, sort_keys=True).encode()
    ).hexdigest()[:16]
    target = out / f"vlm-{family}"
    with open(out / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = target / "recipe.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()).get("key") == key):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out))
            try:
                build_family(family, demo_base, staging, target)
                (staging / "recipe.json").write_text(
                    json.dumps({"key": key, **recipe(family)}, indent=2) + "\n"
                )
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build a tiny vision-language model and a LoRA trained on it."
    )
    parser.add_argument("--out", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--family", choices=sorted(FAMILIES), default="smolvlm")
    args = parser.parse_args()
    folder = build_demo_vlm(args.out, args.family)
    print(f"base: {folder / 'base'}\nadapter: {folder / 'adapter'}")


if __name__ == "__main__":
    main()
