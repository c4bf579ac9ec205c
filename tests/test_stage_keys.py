"""Cache keys are pinned: a key that changes invalidates every user's cache, so it changes only on purpose.

The expected digests were computed by the key payloads as they were before the stage layer existed
(one payload per stage, written inline in the old pipeline). Deliberate changes since: the runtime
quality key names the llama-cpp-python version that scores the pair, the parity key names the
version of what the parity check covers (added tokens, both directions), and the merge arithmetic
version (4: merges that record the coverage ledger) moves the merge key and every key after it; the
chat key names the Ollama version it writes for and the llama.cpp renderer that checks the template."""

from __future__ import annotations

import hashlib
import json

from exporter.engine import stage_keys as keys
from exporter.engine.stage_cache import stage_key

VERSIONS = {
    "edge-export": "0.1.0",
    "torch": "2.13.0",
    "safetensors": "0.8.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "llama-cpp-python": "0.3.36",
    "bitsandbytes": "0.50.2",
}
TRAINED_ON = {
    "quant_type": "nf4",
    "double_quant": True,
    "block_size": 64,
    "compute_dtype": "float32",
    "skip_modules": [],
}
INPUTS = {
    "base": {"config.json": "a" * 64, "model.safetensors": "b" * 64},
    "adapters": [{"files": {"adapter_config.json": "c" * 64}, "weight": 1.0}],
}
OVERRIDES = {"tensor_types": {"output.weight": "Q6_K"}}
OLD_PARITY = "eeb8d41ba9cad4516df6e56dbaa773f3f2ce84b6d52c0a6a3b6103029309db1b"
PINNED = {
    "merge": "5e9151a1cfb18acae926039db0bc932c91a4cf744b956f5e483120b7d66d957a",
    "convert": "04e4f2adf2c58247e82e235d98cbfde92a6c3464b7f5582b30885112cb3d3e6f",
    "chat": "9be749ee2e9501fcec802eaa37a93ad834853bee8bea17b40f7a0b20a8dfff83",
    "stops": "ea7c550c71d8ba9420a2d4cc94e63ea5064cf53bbc307ac0e583b909d164e89d",
    "parity": "48438a90b09c7b187929a8dd5414c97ab6bece2ce49bcf920246c3ed8e0207d8",
    "quantize": "1e130d615d2f224acf68e8eae418e23b3890f476ea286b81346d243cce74747b",
    "quantize-imatrix": "b93c9132fb11f0f3c52560c8b26ffd736fba782f7fedfcc87d320aeedec80e30",
    "imatrix": "ab726a80c4dec9eba56a6763e6f4a554e795ebe605ce676cf146b3f788aed1e1",
    "imatrix-given": "74b8d8fa5ccf5276e6b163a1a5bebd2d16cd286fc9238ccdfdd2af90079b1dbc",
    "quality": "880046c29cb55a26dea92f422031d127224738365be7a8625a24b19eb4d9d3be",
    "convert-base": "14eea32826bf9b470818f8d3bb691044e091a93688db8269c0969d47c8ca31ec",
    "quantize-base": "c70a084e1a2842486b7cf97405c26f69eb693c7b51b5f5858c2866e408df641f",
    "lora": "2a243fb9cb08cffa6d7ed1e5c6af4a87b95984867656bb5bdd7cd821c262049d",
    "reference": "44ede0ba022913895d0cb2d92dcde103167e36e5d8767f0df1eda5ce39956f07",
    "reference-as-trained": "b5ec7573cd2015a46307be3d19db1175d80242e41b81dc9ad673165245a018cc",
    "dequantize": "05f1ce3453982ffbb5b2351e267ce31e1305a936878643460977fb4ba2a56007",
    "losses": "4e9450b33d8062fc8f7073e5073e8a6fa476fe1c11953edcb5c4694afceda752",
    "quality-held-out": "c6d807ef8a3ff2f8b4c3662e91237cb8382f9780f5e50637b3c21b5f645e9815",
    "fit-trial": "10614f02486907af9c64cafc866230d22658d974b4d2dcc65e7aa86415328eee",
    "mmproj": "0c419b95387a0c8ca4537c5bb9b9c3ceaf790518affdb851a004d779e84bb0ea",
    "reference-images": "daff846f7643ffcb168170155fd43930ef873ec8ee1597074a4d919413f8330b",
    "quality-images": "0f67aacc8ad4b3eeb56371b56a2562b4bfbf50998b39d709c31ad21af7f1fe52",
    "quality-images-lora": "22270d4ad37e64725dae79299b3a73be3905844bac36fdba684c09eb6e11fea1",
}
# The runtime quality key before it named llama-cpp-python (results went stale after an upgrade).
OLD_RUNTIME_QUALITY = "50319c9b8890627b76a59831812581210ad16c3a994029a147c8974617d7a6df"


def computed() -> dict[str, str]:
    merge = keys.merge_key(INPUTS, None, VERSIONS)
    convert = keys.convert_key(merge, "0c1e57098", "f16", "demo")
    base = keys.convert_base_key(INPUTS["base"], "0c1e57098", "f16", "base", "u")
    return {
        "merge": merge,
        "convert": convert,
        "chat": keys.chat_key(merge, "0.1.0", "0.34.1", "0c1e57098/render_chat_template-0123456789ab"),
        "stops": keys.stops_key(
            {"Q4_K_M": "a" * 64}, "<|im_end|>", "<|im_start|>user\nHi<|im_end|>\n", 64, "0.1.0"
        ),
        "parity": keys.parity_key(convert, "0.1.0", 2),
        "quantize": keys.quantize_key(convert, "0.3.36", "Q4_K_M", OVERRIDES, None),
        "quantize-imatrix": keys.quantize_key(convert, "0.3.36", "Q4_K_M", OVERRIDES, "d" * 64),
        "imatrix": keys.imatrix_key(convert, "e" * 64, 65536, "float32", VERSIONS),
        "imatrix-given": keys.given_imatrix_key(convert, "f" * 64),
        "quality": keys.quality_key("1" * 64, "2" * 64, "cpu", "0.3.36"),
        "convert-base": base,
        "quantize-base": keys.quantize_key(base, "0.3.36", "Q4_K_M", OVERRIDES, None, runtime_base=True),
        "lora": keys.lora_key(
            {"adapter_config.json": "c" * 64}, base, "0c1e57098", {"model.layers.0.self_attn.q_proj": 2.0}
        ),
        "reference": keys.reference_key(INPUTS, {"sha256": "9" * 64, "n": 3}, 32, "float32", 24, VERSIONS),
        "reference-as-trained": keys.reference_key(
            INPUTS, {"sha256": "9" * 64, "n": 3}, 32, "float32", 24, VERSIONS, TRAINED_ON
        ),
        "dequantize": keys.dequantize_key(INPUTS["base"], TRAINED_ON, VERSIONS),
        "losses": keys.losses_key(keys.quality_key("1" * 64, "2" * 64, "cpu", "0.3.36")),
        "quality-held-out": keys.quality_key("1" * 64, "2" * 64, "cpu", "0.3.36", held_out=[1, 3]),
        "fit-trial": keys.fit_trial_key(
            convert, "2" * 64, [0, 2], {"blk.0.attn_q.weight": "Q4_K"}, None, "0.3.36"
        ),
        "mmproj": keys.mmproj_key(merge, "0c1e57098", "f16", "demo"),
        "reference-images": keys.image_reference_key(INPUTS, [["8" * 64, []]], 32, "float32", 24, VERSIONS),
        "quality-images": keys.image_quality_key("1" * 64, "4" * 64, "2" * 64, "0.3.36"),
        "quality-images-lora": keys.image_quality_key("1" * 64, "4" * 64, "2" * 64, "0.3.36", lora="3" * 64),
    }


def test_every_stage_key_is_what_it_was():
    assert computed() == PINNED


def test_the_runtime_quality_key_names_the_runtime_on_purpose():
    new = keys.quality_key("1" * 64, "2" * 64, "cpu", "0.3.36", lora="3" * 64)
    assert new != OLD_RUNTIME_QUALITY
    assert new != keys.quality_key("1" * 64, "2" * 64, "cpu", "0.3.37", lora="3" * 64)
    old_payload = {
        "stage": "quality",
        "artifact": "1" * 64,
        "lora": "3" * 64,
        "reference": "2" * 64,
        "device": "cpu",
    }
    assert stage_key(old_payload) == OLD_RUNTIME_QUALITY


def test_the_parity_key_names_what_the_check_covers_on_purpose():
    convert = "49e8fce4629486877ddfeaa5d839819a66a44128ae965074e5625253b279edc9"  # before merge arithmetic 4
    assert keys.parity_key(convert, "0.1.0", 2) != OLD_PARITY
    assert stage_key({"stage": "parity", "convert": convert, "edge-export": "0.1.0"}) == OLD_PARITY


def test_keys_depend_on_what_they_name():
    merge = keys.merge_key(INPUTS, None, VERSIONS)
    assert keys.merge_key(INPUTS, "bfloat16", VERSIONS) != merge
    assert keys.merge_key(INPUTS, None, {**VERSIONS, "torch": "2.14.0"}) != merge
    weighted = json.loads(json.dumps(INPUTS))
    weighted["adapters"][0]["weight"] = 0.5
    assert keys.merge_key(weighted, None, VERSIONS) != merge
    assert hashlib.sha256(b"x").hexdigest() not in computed().values()
