"""What the pinned llama.cpp computes of a config.json (exporter/data/llama_cpp_semantics.toml): the table
against the vendored converter and the architecture matrix, and its refusals through the command line."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from converters.vendor import locate_vendored
from exporter.core.errors import InputError
from exporter.inputs.semantics import NULL, check_semantics, holds, rules
from tests.arch_matrix import ARCHITECTURES, COMMON
from tests.conftest import DemoInputs, run_cli
from tests.tiny import copy_tokenizer, make_adapter, make_tiny_llama

COMMIT = "0c1e57098"
# The architecture each model type of the table converts from.
ARCHITECTURE_OF = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "granite": "GraniteForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gpt_oss": "GptOssForCausalLM",
}
# Keys the converter does read for these architectures, and why the row stands anyway.
READ_BY_CONVERTER = {
    ("phi3", "sliding_window"): "written as the GGUF's window, which llama.cpp's phi3 graph leaves unused",
}


def matrix_config(name: str) -> dict:
    import transformers  # not at collection: huggingface_hub reads HF_HUB_CACHE when first imported

    architecture = next(a for a in ARCHITECTURES if a.name == name)
    config_class = getattr(transformers, architecture.config_class)
    return config_class(**{**COMMON, "vocab_size": 512, **architecture.config}).to_dict()


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_every_row_of_the_architecture_matrix_is_computed_as_its_config_says(architecture):
    """The matrix's configs (whose F16 GGUFs the matrix measures within 1e-4 of transformers) are not
    refused; gpt-oss's YaRN truncate = false is the one difference, reported as growing with position."""
    notes = check_semantics(Path("base"), matrix_config(architecture.name), COMMIT)
    if architecture.name == "gpt-oss":
        assert len(notes) == 1 and "rope.truncate = False" in notes[0], notes
    else:
        assert notes == []


def converter_classes(conversion: Path) -> dict[str, tuple[list[str], str, list[str]]]:
    """Every class of the vendored converter: name -> (the architectures it registers, its source, its bases)."""
    classes = {}
    for path in conversion.glob("*.py"):
        text = path.read_text()
        for node in ast.parse(text).body:
            if not isinstance(node, ast.ClassDef):
                continue
            registered = [
                arg.value
                for decorator in node.decorator_list
                if isinstance(decorator, ast.Call)
                for arg in decorator.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ]
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            classes[node.name] = (registered, ast.get_source_segment(text, node) or "", bases)
    return classes


def test_every_row_names_a_converted_architecture_and_a_key_its_converter_ignores():
    """Each row's architecture is converted by the vendored converter, and a plain config key the row says
    llama.cpp does not compute is read nowhere in the classes that convert that architecture (their bases
    included): nothing of it reaches the GGUF."""
    classes = converter_classes(locate_vendored().convert_hf_script.parent / "conversion")

    def lineage(name: str) -> list[str]:
        registered, source, bases = classes.get(name, ([], "", []))
        return [source, *(text for base in bases for text in lineage(base))]

    for rule in rules():
        assert rule.why and rule.fix and (rule.severity == "refuse" or rule.only_beyond), rule
        for model_type in rule.models:
            architecture = ARCHITECTURE_OF[model_type]
            converting = [name for name, (registered, _, _) in classes.items() if architecture in registered]
            assert converting, f"{architecture} is not registered by the vendored converter"
            if rule.setting.startswith("rope.") or (model_type, rule.setting) in READ_BY_CONVERTER:
                continue
            for name in converting:
                assert all(f'"{rule.setting}"' not in text for text in lineage(name)), (
                    model_type,
                    rule.setting,
                    name,
                )


def test_a_setting_llama_cpp_does_not_compute_is_refused_by_name():
    import transformers

    qwen3_moe = transformers.Qwen3MoeConfig(**COMMON).to_dict()  # transformers' default norm_topk_prob: false
    with pytest.raises(InputError) as refused:
        check_semantics(Path("base"), qwen3_moe, COMMIT)
    message = str(refused.value)
    assert "base/config.json (qwen3_moe) computes with norm_topk_prob = False" in message, message
    assert "always renormalises the top-k routing weights" in message and "another model" in message
    assert check_semantics(Path("base"), {**qwen3_moe, "norm_topk_prob": True}, COMMIT) == []

    gemma = matrix_config("Gemma-3")
    with pytest.raises(InputError, match="query_pre_attn_scalar = 24"):
        check_semantics(Path("base"), {**gemma, "query_pre_attn_scalar": 24}, COMMIT)
    wide = {
        **gemma,
        "num_hidden_layers": 62,
        "layer_types": None,
        "query_pre_attn_scalar": gemma["hidden_size"] // 4,
    }
    assert check_semantics(Path("base"), {**wide, "num_attention_heads": 4}, COMMIT) == []  # 27B's rule

    llama = matrix_config("Llama")
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 512,
    }
    assert check_semantics(Path("base"), {**llama, "rope_parameters": yarn}, COMMIT) == []
    with pytest.raises(InputError, match="rope.beta_fast = 16"):
        check_semantics(Path("base"), {**llama, "rope_parameters": {**yarn, "beta_fast": 16}}, COMMIT)
    with pytest.raises(InputError, match="rope.type = 'longrope'"):
        check_semantics(Path("base"), {**llama, "rope_parameters": {**yarn, "rope_type": "longrope"}}, COMMIT)
    mistral = {**matrix_config("Mistral"), "sliding_window": 4096}  # Mistral-7B-v0.1's
    (note,) = check_semantics(Path("base"), mistral, COMMIT)
    assert "sliding_window = 4096" in note and "up to sliding_window tokens" in note


def test_a_multimodal_config_is_judged_by_its_language_model():
    text = {**matrix_config("Gemma-3"), "query_pre_attn_scalar": 24}
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
    }
    with pytest.raises(InputError, match="gemma3_text"):
        check_semantics(Path("base"), config, COMMIT)
    rule = next(r for r in rules() if r.setting == "query_pre_attn_scalar" and "gemma3" in r.models)
    assert holds(rule, {**text, "query_pre_attn_scalar": text["head_dim"]})
    assert NULL == "null"


def test_refused_through_the_command_line_before_any_work(demo_inputs: DemoInputs, tmp_path: Path):
    base = make_tiny_llama(tmp_path / "base")
    copy_tokenizer(demo_inputs.base, base)
    adapter = make_adapter(base, tmp_path / "adapter")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    out = tmp_path / "out"
    proc = run_cli("merge-quantize", "--adapter", str(adapter), "--base", str(base), "--out", str(out))
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "computes with hidden_act = 'gelu', which llama.cpp 0c1e57098 does not" in message, message
    assert "hard-codes a SiLU-gated MLP" in message and "needs hidden_act silu" in message
    assert "merging" not in proc.stdout and not out.exists()
    shutil.rmtree(base)
