"""Bad input through the real command line: exit code 2, a message naming the file and the fix, nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.tiny import copy_tokenizer, make_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, demo_inputs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_llama(root / "base")
    other = make_tiny_llama(root / "other-base", hidden=32)
    for folder in (base, other):  # the tokenizer llama.cpp needs, checked before any work
        copy_tokenizer(demo_inputs.base, folder)
    adapter = make_adapter(base, root / "adapter")
    return {"root": root, "base": base, "other": other, "adapter": adapter}


def assert_clean_failure(proc, out: Path, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in proc.stderr
    assert not out.exists(), f"{out} was left behind"


def merge_quantize(*args: str):
    return run_cli("merge-quantize", *args)


def test_missing_adapter_folder(tmp_path: Path):
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tmp_path / "nope"), "--out", str(out))
    assert_clean_failure(proc, out, str(tmp_path / "nope"), "does not exist")


def test_folder_without_adapter_config(tmp_path: Path, tiny):
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tiny["base"]), "--out", str(out))
    assert_clean_failure(proc, out, str(tiny["base"] / "adapter_config.json"), "is missing")


def test_adapter_config_that_is_not_json(tmp_path: Path, tiny):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(adapter), "--out", str(out))
    assert_clean_failure(proc, out, "adapter_config.json is not valid JSON")


def test_pickle_adapter_needs_allow_pickle(tmp_path: Path, tiny):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(adapter), "--base", str(tiny["base"]), "--out", str(out))
    assert_clean_failure(proc, out, "adapter_model.bin", "--allow-pickle")


def test_unknown_profile_lists_valid_names(tmp_path: Path, tiny):
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tiny["adapter"]), "--profile", "Q4_K_XL", "--out", str(out))
    assert_clean_failure(proc, out, "unknown profile 'Q4_K_XL'", "Q4_K_M", "Q8_0")


def test_profile_that_needs_an_importance_matrix(tmp_path: Path, tiny):
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tiny["adapter"]), "--profile", "IQ4_XS", "--out", str(out))
    assert_clean_failure(proc, out, "IQ4_XS needs an importance matrix")


def test_base_not_found_anywhere(tmp_path: Path, tiny):
    out = tmp_path / "out"
    proc = merge_quantize(
        "--adapter", str(tiny["adapter"]), "--base", "someone/not-cached-model", "--out", str(out)
    )
    assert_clean_failure(proc, out, "'someone/not-cached-model'", "local Hugging Face cache", "--base")


def test_default_base_from_adapter_config_that_is_gone(tmp_path: Path, tiny):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(adapter), "--out", str(out))
    assert_clean_failure(proc, out, str(tmp_path / "moved-away"), "--base")


def test_adapter_for_another_base_by_config(tmp_path: Path, tiny):
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tiny["adapter"]), "--base", str(tiny["other"]), "--out", str(out))
    assert_clean_failure(
        proc,
        out,
        "adapter_config.json was trained on",
        "hidden_size=32",
        "Pass the base the adapter was trained on",
    )


def test_adapter_for_another_base_by_shape(tmp_path: Path, tiny):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/model-not-on-this-machine"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(adapter), "--base", str(tiny["other"]), "--out", str(out))
    assert_clean_failure(
        proc, out, "adapter_model.safetensors", "which does not fit the base tensor", "--base"
    )


def test_corrupt_adapter_weights(tmp_path: Path, tiny):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny["adapter"], adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(adapter), "--base", str(tiny["base"]), "--out", str(out))
    assert_clean_failure(proc, out, str(weights), "truncated or corrupt")


def test_existing_output_is_not_overwritten_without_force(tmp_path: Path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    proc = merge_quantize("--adapter", str(tiny["adapter"]), "--base", str(tiny["base"]), "--out", str(out))
    assert proc.returncode == 2
    assert "--force" in proc.stderr
    assert (out / "manifest.json").read_text() == "{}"


def test_unsupported_architecture_rolls_back_everything(tmp_path: Path, tiny):
    base = tmp_path / "exotic-base"
    shutil.copytree(tiny["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["ExoticForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = merge_quantize("--adapter", str(tiny["adapter"]), "--base", str(base), "--out", str(out))
    assert_clean_failure(proc, out, "ExoticForCausalLM", "not supported by llama.cpp 0c1e57098")


def test_missing_required_option_is_a_usage_error():
    proc = merge_quantize("--out", "somewhere")
    assert proc.returncode == 2
    assert "--adapter" in proc.stderr
