"""exporter.inputs.dialects on files the real releases write: transformers 4.57.6 (side env) and 5.23 (this one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.inputs.dialects import (
    Rope,
    classify_full_key,
    portable_config,
    portable_tokenizer_config,
    read_chat_template,
    read_dtype,
    read_rope,
    special_token_list,
)
from tests.sideenv import side_env

# The same models, spelled by each major: Gemma-3 (one rope per layer type, linear scaling on the global
# layers) and Llama 3.1 (llama3 scaling).
SAVE_CONFIGS = """
import json, sys
import transformers
from transformers import Gemma3TextConfig, LlamaConfig
major = int(transformers.__version__.split(".")[0])
if major >= 5:
    gemma = Gemma3TextConfig(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    llama = LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, dtype="bfloat16")
else:
    gemma = Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0})
    llama = LlamaConfig(max_position_embeddings=131072, rope_theta=5e5, torch_dtype="bfloat16", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
for name, config in (("gemma", gemma), ("llama", llama)):
    config.save_pretrained(f"{sys.argv[1]}/{name}")
"""

READ_CONFIGS = """
import json, sys
from transformers import AutoConfig
out = {}
for name in ("gemma", "llama"):
    c = AutoConfig.from_pretrained(f"{sys.argv[1]}/{name}")
    out[name] = {k: getattr(c, k, None) for k in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
print(json.dumps(out))
"""

GEMMA = Rope(1e6, {"rope_type": "linear", "factor": 8.0}, 1e4)
LLAMA = Rope(
    5e5,
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """config.json files saved by each major (the 4.x one in its own environment)."""
    folders = {}
    for release in ("4.57.6", "5.23.0"):
        folder = tmp_path_factory.mktemp(f"configs-{release}")
        side_env(release, "0.21.2").run("-c", SAVE_CONFIGS, str(folder))
        folders[release] = folder
    return folders


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "config.json").read_text())


@pytest.mark.parametrize("release", ["4.57.6", "5.23.0"])
def test_rope_has_one_meaning_whichever_major_wrote_it(configs: dict[str, Path], release: str):
    assert read_rope(load(configs[release], "gemma")) == GEMMA
    assert read_rope(load(configs[release], "llama")) == LLAMA
    assert read_dtype(load(configs[release], "llama")) == "bfloat16"


def test_portable_config_reads_in_transformers_4_as_it_wrote_it(configs: dict[str, Path], tmp_path: Path):
    """What 5.x writes, made portable, is the model 4.57 itself would have written."""
    for name in ("gemma", "llama"):
        (tmp_path / name).mkdir()
        written = portable_config(load(configs["5.23.0"], name), "bfloat16")
        (tmp_path / name / "config.json").write_text(json.dumps(written))
        assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    old = side_env("4.57.6", "0.21.2")
    as_read = json.loads(old.run("-c", READ_CONFIGS, str(tmp_path)).splitlines()[-1])
    as_written = json.loads(old.run("-c", READ_CONFIGS, str(configs["4.57.6"])).splitlines()[-1])
    assert as_read == as_written
    assert as_read["gemma"] == {
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }
    # and 5.x reads the portable file as the model it wrote
    from transformers import AutoConfig

    for name in ("gemma", "llama"):
        ours = AutoConfig.from_pretrained(tmp_path / name).rope_parameters
        assert ours == AutoConfig.from_pretrained(configs["5.23.0"] / name).rope_parameters


def test_tokenizer_config_dialects():
    written_by_5 = {
        "tokenizer_class": "TokenizersBackend",
        "backend": "tokenizers",
        "extra_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }
    portable = portable_tokenizer_config(written_by_5)
    assert portable["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert portable["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert "extra_special_tokens" not in portable
    named_by_4 = {"extra_special_tokens": {"image_token": "<image>"}, "additional_special_tokens": ["<a>"]}
    assert portable_tokenizer_config(named_by_4) == named_by_4  # a 4.x dict of named tokens stays
    assert special_token_list(named_by_4) == ["<a>", "<image>"]
    assert special_token_list({"additional_special_tokens": [{"content": "<x>", "special": True}]}) == ["<x>"]


def test_chat_template_wherever_it_was_saved(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "in config"}))
    assert read_chat_template(tmp_path) == "in config"
    (tmp_path / "chat_template.jinja").write_text("in jinja")
    assert read_chat_template(tmp_path) == "in jinja"
    processor = tmp_path / "processor"
    processor.mkdir()
    (processor / "chat_template.json").write_text(json.dumps({"chat_template": "in json"}))
    assert read_chat_template(processor) == "in json"
    assert read_chat_template(processor, include_processor=False) is None


@pytest.mark.parametrize(
    ("key", "name", "kind"),
    [
        ("lm_head.weight", "lm_head.weight", "plain"),
        ("lm_head.modules_to_save.weight", "lm_head.weight", "trained copy"),
        ("lm_head.modules_to_save.default.weight", "lm_head.weight", "trained copy"),
        ("score.original_module.weight", "score.weight", "original copy"),
        ("model.embed_tokens.base_layer.weight", "model.embed_tokens.weight", "plain"),
    ],
)
def test_modules_to_save_key_layouts(key: str, name: str, kind: str):
    assert (classify_full_key(key).name, classify_full_key(key).kind) == (name, kind)
