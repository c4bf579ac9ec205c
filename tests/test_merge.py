"""The streaming merge against PEFT's own merge_and_unload, on tiny real models and real adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.core.hashing import sha256_file
from exporter.inputs.adapter import read_adapter
from exporter.merge import merge_adapters
from tests.tiny import make_adapter, make_ia3_adapter, make_tiny_gpt2, make_tiny_llama


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("merge") / "base")


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("merge") / "untied", tie=False)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("merge") / "gpt2")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


IDS = torch.arange(0, 40).reshape(2, 20) % 200


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_reference(base: Path, adapters: list[tuple[Path, float]]):
    """(logits of the unmerged PEFT model, fp16 state dict PEFT's merge_and_unload produces)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name="a0")
    for index, (path, _) in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"a{index}")
    if len(adapters) > 1:
        peft_model.add_weighted_adapter(
            [f"a{i}" for i in range(len(adapters))],
            [w for _, w in adapters],
            "combined",
            combination_type="cat",
        )
        peft_model.set_adapter("combined")
    elif adapters[0][1] != 1.0:
        raise ValueError("single weighted adapters are compared through add_weighted_adapter")
    logits = logits_of(peft_model)
    merged = peft_model.merge_and_unload()
    state = {k: v.to(torch.float16) for k, v in merged.state_dict().items()}
    return logits, state


def assert_matches_peft(
    base: Path, adapters: list[tuple[Path, float]], out: Path, skip_tensors: tuple[str, ...] = (), **kwargs
):
    """Our merge equals PEFT's: every tensor (within fp16 rounding) and the unmerged model's logits."""
    from transformers import AutoModelForCausalLM

    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    peft_logits, peft_state = peft_reference(base, adapters)
    # The adapter must matter, or the comparison below proves nothing.
    assert (peft_logits - base_logits).abs().max() > 0.05
    result = merge_adapters(base, [read_adapter(p, w) for p, w in adapters], out, **kwargs)
    ours = load_state(out)
    assert result.merged_tensors > 0
    for name, tensor in ours.items():
        if name in skip_tensors:
            continue
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(tensor.float(), peft_state[name].float(), rtol=2e-3, atol=2e-4, msg=name)
    logits = logits_of(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    torch.testing.assert_close(logits, peft_logits, rtol=0, atol=2e-2)
    return result, ours


def test_plain_lora(tiny_base: Path, tmp_path: Path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


def test_rslora_scaling(tiny_base: Path, tmp_path: Path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", r=16, lora_alpha=8, use_rslora=True)
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


def test_rank_and_alpha_patterns(tiny_base: Path, tmp_path: Path):
    adapter = make_adapter(
        tiny_base,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, "o_proj": 1},
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


def test_two_adapters_with_weights(tiny_base: Path, tmp_path: Path):
    first = make_adapter(tiny_base, tmp_path / "first", seed=1)
    second = make_adapter(tiny_base, tmp_path / "second", seed=2, target_modules=["q_proj", "v_proj"])
    assert_matches_peft(tiny_base, [(first, 1.0), (second, 0.5)], tmp_path / "merged")


def test_streaming_into_several_shards(tiny_base: Path, tmp_path: Path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    single = tmp_path / "single"
    merge_adapters(tiny_base, [read_adapter(adapter)], single)
    sharded = tmp_path / "sharded"
    result = merge_adapters(tiny_base, [read_adapter(adapter)], sharded, max_shard_bytes=40_000)
    assert result.shards > 3
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in sharded.glob("model-*.safetensors")}
    # The writer hashed each shard as it wrote it; the stage cache records these digests.
    assert result.shard_sha256 == {p.name: sha256_file(p) for p in sharded.glob("model-*.safetensors")}
    one, many = load_state(single), load_state(sharded)
    assert one.keys() == many.keys()
    for name in one:
        assert torch.equal(one[name], many[name]), name
    # The sharded output is itself a valid base for a further merge (index-driven reading).
    again = merge_adapters(sharded, [read_adapter(adapter, weight=0.0)], tmp_path / "again")
    assert again.total_tensors == len(one)


def copy_of(folder: Path, target: Path) -> Path:
    target.mkdir()
    for file in folder.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_side_files_are_carried_through(tiny_base: Path, tmp_path: Path):
    base = copy_of(tiny_base, tmp_path / "base")
    (base / "LICENSE").write_text("license text")
    (base / "tokenizer_config.json").write_text('{"chat_template": "base"}')
    (base / "tokenizer.json").write_text("{}")
    adapter = make_adapter(base, tmp_path / "adapter")
    (adapter / "tokenizer_config.json").write_text('{"chat_template": "from the adapter"}')
    out = tmp_path / "merged"
    merge_adapters(base, [read_adapter(adapter)], out)
    assert (out / "LICENSE").read_text() == "license text"
    assert (out / "generation_config.json").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "from the adapter"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert not list(tmp_path.glob(".merged.partial-*"))


def test_adapters_chat_template_is_not_overridden_by_the_bases_jinja_file(tiny_base: Path, tmp_path: Path):
    base = copy_of(tiny_base, tmp_path / "base")
    (base / "chat_template.jinja").write_text("base template")
    adapter = make_adapter(base, tmp_path / "adapter")
    (adapter / "tokenizer_config.json").write_text('{"chat_template": "from the adapter"}')
    out = tmp_path / "merged"
    merge_adapters(base, [read_adapter(adapter)], out)
    # transformers prefers chat_template.jinja: copying the base's would silently replace the adapter's.
    assert not (out / "chat_template.jinja").exists()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "from the adapter"


def test_dora(tiny_base: Path, tmp_path: Path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", use_dora=True, perturb=True)
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


def test_fan_in_fan_out_conv1d_with_lora_bias(gpt2_base: Path, tmp_path: Path):
    adapter = make_adapter(
        gpt2_base,
        tmp_path / "adapter",
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_bias=True,
        perturb=True,
    )
    assert_matches_peft(gpt2_base, [(adapter, 1.0)], tmp_path / "merged")


def test_dora_on_conv1d(gpt2_base: Path, tmp_path: Path):
    adapter = make_adapter(
        gpt2_base,
        tmp_path / "adapter",
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        use_dora=True,
        perturb=True,
    )
    assert_matches_peft(gpt2_base, [(adapter, 1.0)], tmp_path / "merged")


def test_trained_biases_bias_all(gpt2_base: Path, tmp_path: Path):
    adapter = make_adapter(
        gpt2_base,
        tmp_path / "adapter",
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        bias="all",
        perturb=True,
    )
    _, ours = assert_matches_peft(gpt2_base, [(adapter, 1.0)], tmp_path / "merged")
    assert "transformer.h.0.mlp.c_fc.bias" in ours  # a bias outside the LoRA modules, trained too


def test_lora_on_untied_lm_head_and_embedding(untied_base: Path, tmp_path: Path):
    adapter = make_adapter(
        untied_base, tmp_path / "adapter", target_modules=["q_proj", "lm_head", "embed_tokens"]
    )
    assert_matches_peft(untied_base, [(adapter, 1.0)], tmp_path / "merged")


def test_modules_to_save_on_untied_base(untied_base: Path, tmp_path: Path):
    adapter = make_adapter(
        untied_base,
        tmp_path / "adapter",
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
        perturb=True,
    )
    assert_matches_peft(untied_base, [(adapter, 1.0)], tmp_path / "merged")


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("embedding LoRA", {"target_modules": ["q_proj", "embed_tokens"]}),
        ("lm_head LoRA", {"target_modules": ["q_proj", "lm_head"]}),
        ("lm_head copy", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "perturb": True}),
        (
            "embedding copy",
            {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "perturb": True},
        ),
    ],
)
def test_tied_embeddings_are_untied_when_one_side_changes(tiny_base: Path, tmp_path: Path, case, options):
    """The unmerged PEFT model changes one side of a tied embedding; the merged one must behave the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_base, tmp_path / "adapter", **options)
    base_state = load_state(tiny_base)
    assert "lm_head.weight" not in base_state
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), adapter
    )
    expected = logits_of(unmerged)
    result = merge_adapters(tiny_base, [read_adapter(adapter)], tmp_path / "merged")
    assert result.untied_embeddings, case
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ours = load_state(tmp_path / "merged")
    embedding, head = ours["model.embed_tokens.weight"], ours["lm_head.weight"]
    original = base_state["model.embed_tokens.weight"]
    changed_head = "lm_head" in case
    assert torch.equal(embedding if changed_head else head, original)  # the other side is the original
    assert not torch.equal(head if changed_head else embedding, original)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits_of(merged), expected, rtol=0, atol=2e-2)


def test_ia3(tiny_base: Path, gpt2_base: Path, tmp_path: Path):
    llama = make_ia3_adapter(
        tiny_base, tmp_path / "llama-ia3", ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    )
    assert_matches_peft(tiny_base, [(llama, 1.0)], tmp_path / "llama-merged")
    gpt2 = make_ia3_adapter(
        gpt2_base, tmp_path / "gpt2-ia3", ["c_attn", "c_fc"], ["c_fc"], fan_in_fan_out=True
    )
    assert_matches_peft(gpt2_base, [(gpt2, 1.0)], tmp_path / "gpt2-merged")


def test_bf16_base_precision_follows_its_range_and_dtype_can_be_chosen(tmp_path: Path):
    from safetensors.torch import save_file

    base = make_tiny_llama(tmp_path / "bf16-base", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter")
    result = merge_adapters(base, [read_adapter(adapter)], tmp_path / "merged")
    assert result.dtype == "float16" and "fits float16" in result.dtype_reason  # after the range check
    as_bf16 = merge_adapters(base, [read_adapter(adapter)], tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_state(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert as_bf16.max_abs is not None and as_bf16.fits_float16
    # One value past float16's range, in a tensor the adapter does not touch: a float32 merge (the master).
    weights = load_state(base)
    weights["model.norm.weight"][3] = 70000.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    kept = merge_adapters(base, [read_adapter(adapter)], tmp_path / "kept")
    assert kept.dtype == "float32" and "model.norm.weight" in kept.dtype_reason and not kept.fits_float16
    assert kept.gguf_ftype == "F32"
    assert (
        load_state(tmp_path / "kept")["model.norm.weight"][3].item() == weights["model.norm.weight"][3].item()
    )


def test_kasa_truncates_the_base_and_adds_the_diagonal_update(tiny_base: Path, tmp_path: Path):
    """PEFT 0.21's KaSA: the base weight loses its r smallest singular components, ΔW = s·B·diag·A."""
    from peft import KasaConfig

    adapter = make_adapter(tiny_base, tmp_path / "adapter", kasa_config=KasaConfig())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.lora_diag") for k in tensors)
    _, merged = assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")
    # Not a plain LoRA: without the truncation the merged weights would differ.
    weight = load_state(tiny_base)["model.layers.0.self_attn.q_proj.weight"].float()
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    plain = weight + 2.0 * (b * tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_diag"]) @ a
    assert (merged["model.layers.0.self_attn.q_proj.weight"].float() - plain).abs().max() > 5e-4


def test_block_diagonal_lora_is_unpacked(tiny_base: Path, tmp_path: Path):
    from peft import BdLoraConfig

    bd = BdLoraConfig(
        target_modules_bd_a=["o_proj", "down_proj"],
        target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
        nblocks=2,
    )
    adapter = make_adapter(tiny_base, tmp_path / "adapter", use_bdlora=bd, fill_lora=True)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tuple(tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape) == (64, 2)
    assert tuple(tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape) == (4, 32)
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


@pytest.mark.parametrize("variant", ["monteclora", "velora"])
def test_training_only_variants_merge_as_plain_lora(variant: str, tiny_base: Path, tmp_path: Path):
    """MonteCLoRA and VeLoRA act only while training; their extra saved tensors are dropped."""
    from peft import MontecloraConfig, VeloraConfig

    options = {
        "monteclora": {"monteclora_config": MontecloraConfig()},
        "velora": {"velora_config": VeloraConfig()},
    }
    adapter = make_adapter(tiny_base, tmp_path / "adapter", **options[variant])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(f"lora_{variant}" in k for k in tensors), sorted(tensors)
    assert_matches_peft(tiny_base, [(adapter, 1.0)], tmp_path / "merged")


def test_conv1d_and_linear_targets_are_oriented_per_layer(gpt2_base: Path, tmp_path: Path):
    """PEFT sets fan_in_fan_out per layer (True on Conv1D, False on nn.Linear) and saves whichever came
    last; the merge must orient every layer by its own type, not by the saved flag."""
    adapter = make_adapter(gpt2_base, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "lm_head"])
    saved = json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    assert saved is False  # wrong for the Conv1D layers (c_proj is square: shapes cannot tell)
    assert_matches_peft(
        gpt2_base,
        [(adapter, 1.0)],
        tmp_path / "merged",
        skip_tensors=("lm_head.weight", "transformer.wte.weight"),
    )  # PEFT's own merge_and_unload changes both sides of the tied pair: compared on the unmerged logits
