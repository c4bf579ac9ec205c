"""The architecture matrix's inputs: one tiny real-layout model per architecture and a LoRA trained on it.

Each base is built by transformers 5.23 from the architecture's own config class (random init, hidden 64,
SmolLM2's tokenizer and vocabulary, so llama.cpp's converter meets a real tokenizer), saved in float16 as
transformers saves it (mixture-of-experts layers per expert on disk, fused in memory). Each adapter is
trained a few steps by PEFT 0.21 on the demo's pirate chats: attention and MLP layers through
target_modules, and the fused expert parameters (and routers) of the MoE models through target_parameters,
the way people fine-tune Qwen3-MoE, Mixtral and gpt-oss today. The init is wide (initializer_range 0.2), so
the random base is peaked rather than near-uniform and the trained adapter visibly moves its logits.

Built once per recipe and cached outside the checkout (tests/sideenv.py's cache_dir()).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.sideenv import cache_dir

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
FUSED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
STEPS = 10
RECIPE_VERSION = 1  # bumped when _build_into changes what it builds
WINDOW = 64
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
MOE = {"num_experts_per_tok": 2}
GEMMA_TOKENS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
# Gemma's turn format, for the SentencePiece tokenizer trained below.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


CHECK_ONLY = ("f16_max_kld", "gates", "export_name")  # Architecture fields that do not change what is built


@dataclass(frozen=True)
class Architecture:
    """One row of the matrix: how to build the base and which layers the adapter trains."""

    name: str  # as the README names it
    config_class: str  # transformers' config class
    config: dict[str, Any]
    target_modules: list[str]
    target_parameters: list[str] = field(default_factory=list)
    tokenizer_class: str | None = None  # tokenizer_config.json's class, where the converter needs a given one
    sentencepiece: bool = False  # the converter reads only a SentencePiece tokenizer.model (Gemma-2)
    moe: bool = False
    # The F16 GGUF's largest mean KLD from the unmerged model. 1e-4 everywhere but gpt-oss, where
    # llama.cpp's runtime itself differs from transformers: the merged folder matches the unmerged model to
    # 2e-6 in transformers, its F16 GGUF measured 7e-5 and 1.6e-4 on two trained adapters, and near-tied
    # routers flip top-1 tokens (95-99 % agree), so its top-1 gates are lowered.
    f16_max_kld: float = 1e-4
    gates: tuple[str, ...] = ()  # --gate overrides merge-quantize is run with
    export_name: str = ""  # --name of its exports, where the slug will not do

    @property
    def slug(self) -> str:
        return self.name.lower().replace(" ", "-")

    @property
    def export(self) -> str:
        return self.export_name or self.slug


ARCHITECTURES = [
    Architecture("Llama", "LlamaConfig", {}, ATTENTION + MLP),
    Architecture("Mistral", "MistralConfig", {"sliding_window": None}, ATTENTION + MLP),
    # transformers 5 loads any tokenizer of a qwen2 model as Qwen2Tokenizer, whose pre-tokenizer rebuilt on
    # SmolLM2's vocabulary llama.cpp does not know; with a tokenizer.model, its converter reads SentencePiece.
    Architecture("Qwen2", "Qwen2Config", GEMMA_TOKENS, ATTENTION + MLP, sentencepiece=True),
    Architecture("Qwen3", "Qwen3Config", {"head_dim": 16}, ATTENTION + MLP),
    Architecture(
        "Granite",
        "GraniteConfig",
        {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.9,
            "attention_multiplier": 0.25,
            "logits_scaling": 1.1,
        },
        ATTENTION + MLP,
    ),
    Architecture(
        "Phi-3",
        "Phi3Config",
        {"max_position_embeddings": 4096},  # llama.cpp reads a shorter context than the original as none
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        tokenizer_class="GPT2Tokenizer",
        # llama.cpp cannot load a GGUF named like Phi-3 whose vocabulary lacks </s>, <unk> and <s> (SmolLM2's
        # does): merge-quantize refuses the name "phi-3" for it (test_a_phi_3_name_llama_cpp_cannot_load).
        export_name="tiny-ph3",
    ),
    Architecture(
        "Gemma-2",
        "Gemma2Config",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128, **GEMMA_TOKENS},
        ATTENTION + MLP,
        sentencepiece=True,
    ),
    Architecture(
        "Gemma-3",
        "Gemma3TextConfig",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 128},
        ATTENTION + MLP,
    ),
    Architecture(
        "Qwen3-MoE",
        "Qwen3MoeConfig",
        {**MOE, "head_dim": 16, "num_experts": 4, "moe_intermediate_size": 32, "norm_topk_prob": True},
        ATTENTION,
        [*FUSED_EXPERTS, "mlp.gate.weight"],
        moe=True,
    ),
    Architecture(
        "Qwen2-MoE",
        "Qwen2MoeConfig",
        {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
        ATTENTION + ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
        FUSED_EXPERTS,
        moe=True,
    ),
    Architecture(
        "Mixtral",
        "MixtralConfig",
        {**MOE, "num_local_experts": 4, "intermediate_size": 32},
        ATTENTION,
        FUSED_EXPERTS,
        moe=True,
    ),
    Architecture(
        "gpt-oss",
        "GptOssConfig",
        {
            **MOE,
            "num_local_experts": 4,
            "intermediate_size": 32,
            "head_dim": 16,
            "sliding_window": 128,
            "max_position_embeddings": 131072,
        },
        ATTENTION,
        [*FUSED_EXPERTS, "mlp.router.weight"],
        moe=True,
        f16_max_kld=1e-3,
        gates=("F16:min_top1=0.9", "Q8_0:min_top1=0.85"),
    ),
]


@dataclass(frozen=True)
class Built:
    architecture: Architecture
    root: Path  # base/, adapter/, training.json

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"


def recipe_key(architecture: Architecture, tokenizer_dir: Path, train: Path) -> str:
    import peft
    import transformers

    payload = json.dumps(
        {
            "architecture": {k: v for k, v in architecture.__dict__.items() if k not in CHECK_ONLY},
            "common": COMMON,
            "steps": STEPS,
            "recipe": RECIPE_VERSION,
            "versions": [transformers.__version__, peft.__version__, torch.__version__],
        },
        sort_keys=True,
        default=str,
    ).encode()
    files = [tokenizer_dir / "tokenizer.json", tokenizer_dir / "chat_template.jinja", train]
    return hashlib.sha256(payload + b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def build(architecture: Architecture, tokenizer_dir: Path, train: Path) -> Built:
    """The architecture's base and trained adapter, from the cache when this recipe was built before."""
    target = (
        cache_dir() / "arch-matrix" / f"{architecture.slug}-{recipe_key(architecture, tokenizer_dir, train)}"
    )
    if not (target / "training.json").is_file():
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        _build_into(architecture, tokenizer_dir, train, staging, target / "base")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return Built(architecture, target)


def _build_into(
    architecture: Architecture, tokenizer_dir: Path, train: Path, out: Path, final_base: Path
) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base_dir, adapter_dir = out / "base", out / "adapter"
    if architecture.sentencepiece:
        tokenizer = _sentencepiece_tokenizer(train, base_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_class = getattr(transformers, architecture.config_class)
    config = config_class(**{**COMMON, "vocab_size": len(tokenizer), **architecture.config})
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    if architecture.tokenizer_class:
        tokenizer_config = base_dir / "tokenizer_config.json"
        values = json.loads(tokenizer_config.read_text())
        tokenizer_config.write_text(
            json.dumps({**values, "tokenizer_class": architecture.tokenizer_class}, indent=2)
        )

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=architecture.target_modules,
        target_parameters=architecture.target_parameters or None,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, lora)
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    peft_model.train()
    losses = []
    for step in range(STEPS):
        text = tokenizer.apply_chat_template(rows[step % len(rows)]["messages"], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:WINDOW]])
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    peft_model.save_pretrained(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(final_base)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (out / "training.json").write_text(json.dumps({"losses": losses}))


def results_file() -> Path:
    """Where the matrix tests record their rows (outside the checkout, beside the cached inputs)."""
    return cache_dir() / "arch-matrix-results.json"


def record_result(architecture: Architecture, column: str, values: dict[str, Any]) -> None:
    """Record one cell of the matrix (under a lock: test runs may overlap)."""
    import fcntl

    import peft
    import transformers

    path = results_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        row = results.setdefault(architecture.name, {})
        row["adapter"] = describe_adapter(architecture)
        row[column] = {**values, "transformers": transformers.__version__, "peft": peft.__version__}
        staging = path.with_name(f".{path.name}.partial")
        staging.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        staging.replace(path)


def describe_adapter(architecture: Architecture) -> str:
    modules = ", ".join(architecture.target_modules)
    if not architecture.target_parameters:
        return f"target_modules: {modules}"
    return f"target_modules: {modules}; target_parameters: {', '.join(architecture.target_parameters)}"


def _sentencepiece_tokenizer(train: Path, folder: Path) -> Any:
    """A real SentencePiece BPE model (byte fallback, Gemma's special tokens and ids) trained on the demo's
    chats by the sentencepiece library, loaded by transformers as a Gemma tokenizer."""
    import sentencepiece
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    rows = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    corpus.write_text("\n".join(m["content"] for row in rows for m in row["messages"]) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    settings = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "chat_template": GEMMA_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return AutoTokenizer.from_pretrained(folder)
