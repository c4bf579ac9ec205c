#!/usr/bin/env python3
"""bench/merge: edge-export's streaming merge against PEFT's merge_and_unload, side by side.

Builds (once, cached in bench/.work/) a synthetic fp16 Llama of about 1.1B parameters in 1 GB
shards (TinyLlama-1.1B's shapes, random weights) and an r=16 LoRA on every linear layer, then
runs, each in its own process on the same inputs:

  edge-export  `python -m exporter merge --adapter A --base B --out O`
  PEFT         AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained
               + merge_and_unload + save_pretrained

and prints wall time, peak RSS (of that process, from wait4) and throughput (base MB / s). The
measuring process imports nothing heavy and builds the inputs in a child of its own: on Linux a
child's peak RSS starts from its parent's size at fork, so a large parent would inflate both.

    .venv/bin/python bench/merge.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "merge"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
SHARD_BYTES = 1 << 30

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="1GB")
"""


def layer_shapes(config: dict[str, Any] = CONFIG) -> list[tuple[str, tuple[int, ...]]]:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config["vocab_size"], h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        shapes.append(("lm_head.weight", (config["vocab_size"], h)))
    return shapes


def build_inputs(
    work: Path = WORK, config: dict[str, Any] = CONFIG, tokenizer_dir: Path | None = None
) -> tuple[Path, Path]:
    """A random fp16 Llama with `config`'s shapes and an r=16 LoRA on it, under `work` (built once).

    With `tokenizer_dir`, its tokenizer, chat template and generation config are copied into the base,
    so the base converts to GGUF like a real model."""
    import torch
    from safetensors.torch import save_file

    base, adapter = work / "base", work / "adapter"
    if (base / "done").is_file() and (adapter / "done").is_file():
        return base, adapter
    shutil.rmtree(work, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    # shards planned first, then each generated and written alone: an 8B body never sits whole in memory
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layer_shapes(config):
        nbytes = math.prod(shape) * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    total = 0
    for number, planned in enumerate(shards, start=1):
        shard = {}
        for name, shape in planned:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.float16)
            else:
                shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
            total += shard[name].numel() * 2
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (base / "config.json").write_text(json.dumps(config))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, base / name)
    lora: dict[str, torch.Tensor] = {}
    for name, shape in layer_shapes(config):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_dim, in_dim = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn((RANK, in_dim), generator=generator) * 0.01
            )
            lora[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn((out_dim, RANK), generator=generator) * 0.01
            )
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": RANK,
                "lora_alpha": 32,
                "lora_dropout": 0.0,
                "target_modules": TARGETS,
                "base_model_name_or_path": str(base),
                "bias": "none",
            }
        )
    )
    (base / "done").write_text("")
    (adapter / "done").write_text("")
    return base, adapter


def measure(command: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[:4]} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each; the best wall time is reported")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_inputs()
        return
    subprocess.run([sys.executable, __file__, "--build"], check=True)
    base, adapter = WORK / "base", WORK / "adapter"
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    params = sum(math.prod(s) for _, s in layer_shapes())
    for file in base.glob("*.safetensors"):  # same page-cache state for both contenders
        with file.open("rb") as handle:
            while handle.read(64 << 20):
                pass
    contenders = {
        "edge-export merge": [
            sys.executable,
            "-m",
            "exporter",
            "merge",
            "--adapter",
            str(adapter),
            "--base",
            str(base),
            "--out",
            str(WORK / "out-edge"),
            "--max-shard-size",
            "1GB",
        ],
        "PEFT merge_and_unload": [
            sys.executable,
            "-c",
            PEFT_SCRIPT,
            str(base),
            str(adapter),
            str(WORK / "out-peft"),
        ],
    }
    results = {}
    for name, command in contenders.items():
        runs = [
            measure(command, WORK / ("out-edge" if name.startswith("edge") else "out-peft"))
            for _ in range(args.runs)
        ]
        results[name] = (min(r[0] for r in runs), max(r[1] for r in runs))
    print(
        f"base: {params / 1e9:.2f}B parameters, {base_bytes / 2**30:.2f} GiB fp16 in "
        f"{len(list(base.glob('*.safetensors')))} shards; adapter: r={RANK} on {', '.join(TARGETS)}; "
        f"{os.cpu_count()} cores"
    )
    print(f"{'':24} {'wall s':>8} {'peak RSS MiB':>13} {'MB/s':>8}")
    for name, (wall, rss) in results.items():
        print(f"{name:24} {wall:8.1f} {rss:13.0f} {base_bytes / 1e6 / wall:8.0f}")
    (edge_wall, edge_rss), (peft_wall, peft_rss) = results.values()
    print(
        f"{'edge-export / PEFT':24} {edge_wall / peft_wall:8.2f}x {edge_rss / peft_rss:12.2f}x"
        f"   (targets: wall <= 0.8x, peak RSS <= 0.3x)"
    )
    shutil.rmtree(WORK / "out-edge", ignore_errors=True)
    shutil.rmtree(WORK / "out-peft", ignore_errors=True)


if __name__ == "__main__":
    main()
