"""What the merge refuses or warns about, each with a clear message and nothing written."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.core.errors import InputError
from exporter.inputs.adapter import read_adapter
from exporter.merge import merge_adapters
from tests.tiny import make_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    base = make_tiny_llama(root / "base")
    return {"base": base, "adapter": make_adapter(base, root / "adapter")}


def peft_adapter(base: Path, folder: Path, config) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(folder, safe_serialization=True)
    return folder


def refuse(base: Path, adapter: Path, out: Path, *fragments: str, weight: float = 1.0, **kwargs) -> None:
    with pytest.raises(InputError) as error:
        merge_adapters(base, [read_adapter(adapter, weight, **kwargs)], out)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("prefix", "PREFIX_TUNING adapter, and prefix tuning adds learned key/value prefixes"),
        ("prompt", "PROMPT_TUNING adapter, and prompt tuning adds learned virtual tokens"),
    ],
)
def test_prefix_and_prompt_tuning_cannot_be_merged(tiny, tmp_path: Path, kind: str, fragment: str):
    from peft import PrefixTuningConfig, PromptTuningConfig

    config = (
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        if kind == "prefix"
        else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    adapter = peft_adapter(tiny["base"], tmp_path / kind, config)
    refuse(tiny["base"], adapter, tmp_path / "out", fragment, "cannot be merged")


def test_other_peft_types_are_named(tiny, tmp_path: Path):
    from peft import LoHaConfig

    adapter = peft_adapter(tiny["base"], tmp_path / "loha", LoHaConfig(target_modules=["q_proj"], r=2))
    refuse(tiny["base"], adapter, tmp_path / "out", "is a LOHA adapter", "merges LORA and IA3")


def test_dora_adapter_cannot_be_weighted(tiny, tmp_path: Path):
    adapter = make_adapter(tiny["base"], tmp_path / "dora", use_dora=True)
    refuse(tiny["base"], adapter, tmp_path / "out", "DoRA adapter and cannot be given a weight", weight=0.5)


@pytest.mark.parametrize("value", [float("nan"), 1e6], ids=["NaN", "overflows float16"])
def test_nan_in_merged_weights_writes_nothing(tiny, tmp_path: Path, value: float):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key][0, :] = value  # finite in float32, 1e6 makes W + ΔW too large for float16
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    refuse(tiny["base"], adapter, tmp_path / "out", "NaN or Inf", "Nothing was written")


def test_quantized_base_is_refused(tiny, tmp_path: Path):
    base = tmp_path / "bnb-base"
    shutil.copytree(tiny["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    refuse(base, tiny["adapter"], tmp_path / "out", "bitsandbytes model", "original 16-bit base")


def test_qlora_adapter_warns_and_merges_onto_the_16_bit_base(tiny, tmp_path: Path, caplog):
    adapter = tmp_path / "qlora"
    shutil.copytree(tiny["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/tiny-llama-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        merge_adapters(tiny["base"], [read_adapter(adapter)], tmp_path / "out")
    assert "quantized base (QLoRA)" in caplog.text and "unsloth/tiny-llama-bnb-4bit" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_pickle_adapter_is_loaded_weights_only_when_allowed(tiny, tmp_path: Path):
    adapter = tmp_path / "pickled"
    shutil.copytree(tiny["adapter"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        read_adapter(adapter)
    merge_adapters(tiny["base"], [read_adapter(adapter, allow_pickle=True)], tmp_path / "from-pickle")
    merge_adapters(tiny["base"], [read_adapter(tiny["adapter"])], tmp_path / "from-safetensors")
    assert (
        load_file(str(tmp_path / "from-pickle" / "model.safetensors")).keys()
        == load_file(str(tmp_path / "from-safetensors" / "model.safetensors")).keys()
    )


class Payload:
    """Stands for an arbitrary object in a pickle: unpickling it would import and run code."""


def test_pickle_with_code_is_refused_even_when_allowed(tiny, tmp_path: Path):
    adapter = tmp_path / "evil"
    shutil.copytree(tiny["adapter"], adapter)
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "payload": Payload()}, adapter / "adapter_model.bin")
    refuse(tiny["base"], adapter, tmp_path / "out", "weights_only=True", allow_pickle=True)


def test_adapter_module_missing_from_base(tiny, tmp_path: Path):
    adapter = tmp_path / "renamed"
    shutil.copytree(tiny["adapter"], adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "query_key_value"): v for k, v in tensors.items()}
    save_file(renamed, str(adapter / "adapter_model.safetensors"))
    refuse(tiny["base"], adapter, tmp_path / "out", "query_key_value.weight", "does not have")
