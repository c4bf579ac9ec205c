"""A tiny real SmolVLM (transformers' Idefics3ForConditionalGeneration) and a LoRA trained on it with images.

Built from its transformers configs with random weights: a 2-layer Llama language model (64 wide) with
SmolLM2's vocabulary and SmolVLM's added tokens, a 2-layer SigLIP vision tower on 64-pixel tiles of 16-pixel
patches, the pixel-shuffle connector (scale factor 2: 4 tokens per tile). Its processor is SmolVLM's,
shrunk: images resized to a 128-pixel longest edge and split into 64-pixel tiles plus the overview, as
llama.cpp's libmtmd lays them out too. The LoRA (r 8, on q_proj/v_proj of both towers and the connector's
projection) is trained for a few steps by PEFT on drawn images with captions, and saved by PEFT 0.21.
Built once per recipe into the test cache (tests.sideenv.trained_run).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.sideenv import trained_run

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
ADDED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]


def smolvlm(demo_base: Path) -> tuple[Path, Path]:
    """(base, adapter): the tiny SmolVLM and a LoRA trained on it with images."""

    def build(staging: Path, target: Path) -> None:
        _build_base(demo_base, staging / "base")
        _train(staging / "base", staging / "adapter")
        config_file = staging / "adapter" / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(target / "base")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    folder = trained_run("smolvlm", demo_base, RECIPE, build)
    return folder / "base", folder / "adapter"


def _build_base(demo_base: Path, base: Path) -> None:
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
    hidden, intermediate, layers, heads, kv_heads = RECIPE["text"]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],  # as SmolVLM's released configs name their language model
    }
    v_hidden, v_intermediate, v_layers, v_heads, tile, patch = RECIPE["vision"]
    vision = {
        "hidden_size": v_hidden,
        "intermediate_size": v_intermediate,
        "num_hidden_layers": v_layers,
        "num_attention_heads": v_heads,
        "image_size": tile,
        "patch_size": patch,
    }
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


def _train(base: Path, adapter: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(base))
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "proj"], lora_dropout=0.0)
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
