"""The streaming merge against PEFT's own merge_and_unload, on tiny real models and real adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.adapter import read_adapter
from exporter.merge import merge_adapters
from tests.tiny import make_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("merge") / "base")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


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
    ids = torch.arange(0, 40).reshape(2, 20) % 200
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    state = {k: v.to(torch.float16) for k, v in merged.state_dict().items()}
    return logits, state


def our_merge(base: Path, adapters: list[tuple[Path, float]], out: Path, **kwargs):
    result = merge_adapters(base, [read_adapter(p, w) for p, w in adapters], out, **kwargs)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(0, 40).reshape(2, 20) % 200
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return result, logits


def assert_matches_peft(base: Path, adapters: list[tuple[Path, float]], out: Path, **kwargs) -> None:
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.arange(0, 40).reshape(2, 20) % 200
    with torch.no_grad():
        base_logits = base_model(input_ids=ids).logits
    peft_logits, peft_state = peft_reference(base, adapters)
    # The adapter must matter, or the comparison below proves nothing.
    assert (peft_logits - base_logits).abs().max() > 0.05
    result, logits = our_merge(base, adapters, out, **kwargs)
    ours = load_state(out)
    assert result.merged_tensors > 0
    for name, tensor in ours.items():
        expected = peft_state[name]
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(tensor.float(), expected.float(), rtol=2e-3, atol=2e-4, msg=name)
    torch.testing.assert_close(logits, peft_logits, rtol=0, atol=2e-2)


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
    one, many = load_state(single), load_state(sharded)
    assert one.keys() == many.keys()
    for name in one:
        assert torch.equal(one[name], many[name]), name
    # The sharded output is itself a valid base for a further merge (index-driven reading).
    again = merge_adapters(sharded, [read_adapter(adapter, weight=0.0)], tmp_path / "again")
    assert again.total_tensors == len(one)


def test_side_files_are_carried_through(tiny_base: Path, tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()
    for file in tiny_base.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
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
