"""Mixture-of-experts adapters merged exactly, and the coverage ledger's refusals and diagnoses.

Tiny real models saved by transformers 5.23 (experts fused in memory, per expert or fused on disk) and real
PEFT 0.21 adapters on their fused expert parameters (target_parameters), routers and shared experts: the
merged folder, loaded by transformers, must give the unmerged PEFT model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.core.errors import InputError
from exporter.inputs.adapter import read_adapter
from exporter.merge import merge_adapters
from tests.tiny import make_adapter, make_tiny_gpt2, make_tiny_llama

SMALL = {
    "vocab_size": 300,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "initializer_range": 0.1,
}
CASES = {
    # Qwen3-MoE: experts per expert on disk, gate and up rows concatenated; the router a 2-D parameter.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16},
        {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]},
    ),
    # Qwen2-MoE: the shared expert is a plain MLP beside the routed ones.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
        {"target_modules": ["shared_expert.gate_proj", "shared_expert.down_proj", "shared_expert_gate"], "target_parameters": ["mlp.experts.gate_up_proj"]},
    ),
    # Mixtral: stored as block_sparse_moe.experts.N.w1/w3/w2, named mlp.* in memory (the router too).
    "mixtral": (
        "MixtralConfig",
        {"num_local_experts": 4, "intermediate_size": 32},
        {"target_modules": ["v_proj"], "target_parameters": ["mlp.experts.down_proj", "mlp.gate.weight"]},
    ),
    # gpt-oss: stored fused and transposed, (experts, in, out), gate and up interleaved.
    "gpt_oss": (
        "GptOssConfig",
        {"num_local_experts": 4, "intermediate_size": 32, "head_dim": 16, "sliding_window": 16},
        {"target_modules": ["o_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"]},
    ),
}  # fmt: skip


def _make_moe(folder: Path, config_class: str, config: dict[str, Any]) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**SMALL, **config))
    model.to(torch.float32).save_pretrained(folder)
    return folder


def _make_moe_adapter(base: Path, folder: Path, lora: dict[str, Any]) -> Path:
    """A real PEFT adapter with every A and B drawn at random (a trained adapter's B is non-zero too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return folder


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_expert_adapter_merges_to_the_unmerged_model(case: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config_class, config, lora = CASES[case]
    base = _make_moe(tmp_path / "base", config_class, config)
    adapter = _make_moe_adapter(base, tmp_path / "adapter", lora)
    result = merge_adapters(
        base, [read_adapter(adapter)], tmp_path / "merged", dtype="float32", provenance={}
    )

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    expected = _logits(unmerged.eval(), ids)
    with unmerged.disable_adapter():
        alone = _logits(unmerged, ids)
    merged = _logits(
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval(), ids
    )
    assert (expected - alone).abs().max() > 0.05  # the adapter changes the output
    assert (merged - expected).abs().max() < 1e-4

    ledger = result.coverage
    assert ledger["merged_tensors"] == ledger["targeted_tensors"] == result.merged_tensors
    assert ledger["adapters"][0]["merged_tensors"] == ledger["adapters"][0]["tensors"]
    recorded = json.loads((tmp_path / "merged" / "edge-export-merge.json").read_text())
    assert recorded["coverage"] == ledger


def test_the_first_fused_parameter_is_the_innermost_wrapper(tmp_path: Path) -> None:
    """PEFT nests wrappers in the order the module registers its parameters, not the config's order."""
    config_class, config, _ = CASES["qwen3_moe"]
    base = _make_moe(tmp_path / "base", config_class, config)
    lora = {"target_modules": [], "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]}
    adapter = _make_moe_adapter(base, tmp_path / "adapter", lora)
    result = merge_adapters(base, [read_adapter(adapter)], tmp_path / "merged", dtype="float32")
    # 2 layers × 4 experts × (gate, up, down)
    assert result.coverage["summary"] == "merged 24 of 24 targeted tensors"


def test_an_update_below_the_output_precision_is_an_error(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    # The same trained tensors at a scaling too small for float16 to hold any of the change.
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e-9}))
    with pytest.raises(InputError, match="smaller than float16's precision") as error:
        merge_adapters(base, [read_adapter(adapter)], tmp_path / "merged")
    assert "q_proj" in str(error.value)
    assert not (tmp_path / "merged").exists()


def test_an_untrained_adapter_is_counted_not_refused(tmp_path: Path) -> None:
    base = make_tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], init_lora_weights=True)
    result = merge_adapters(base, [read_adapter(adapter)], tmp_path / "merged")
    assert result.coverage["merged_tensors"] == 0
    assert len(result.coverage["zero_updates"]) == result.coverage["targeted_tensors"] == 2
    assert "left as in the base" in result.coverage["summary"]


def _without_recorded_base(adapter: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    return adapter


def test_names_that_match_nothing_are_diagnosed(tmp_path: Path) -> None:
    llama = make_tiny_llama(tmp_path / "llama")
    config_class, config, lora = CASES["qwen3_moe"]
    moe = _make_moe(tmp_path / "moe", config_class, config)

    fused = _without_recorded_base(_make_moe_adapter(moe, tmp_path / "fused", lora))
    with pytest.raises(InputError, match="fused expert parameters") as error:
        merge_adapters(llama, [read_adapter(fused)], tmp_path / "out1")
    assert "mlp.experts" in str(error.value) and "different base" not in str(error.value)

    deeper = _without_recorded_base(
        make_adapter(make_tiny_llama(tmp_path / "deep", layers=4), tmp_path / "a4")
    )
    with pytest.raises(InputError, match="in layer 2, but the base .* has 2 layers"):
        merge_adapters(llama, [read_adapter(deeper)], tmp_path / "out2")

    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    other = _without_recorded_base(make_adapter(gpt2, tmp_path / "a-gpt2", target_modules=["c_attn"]))
    with pytest.raises(
        InputError, match="nor any c_attn layer: the adapter was trained for another architecture"
    ):
        merge_adapters(llama, [read_adapter(other)], tmp_path / "out3")
    for name in ("out1", "out2", "out3"):
        assert not (tmp_path / name).exists()


def test_a_fused_expert_adapter_on_a_base_that_stores_experts_fused_is_refused_at_runtime(
    tmp_path: Path,
) -> None:
    from exporter.merge.runtime_adapter import runtime_correction

    config_class, config, lora = CASES["gpt_oss"]
    base = _make_moe(tmp_path / "base", config_class, config)
    adapter = _make_moe_adapter(base, tmp_path / "adapter", lora)
    with pytest.raises(InputError, match="fused experts .* merge-quantize"):
        runtime_correction(read_adapter(adapter), base)
