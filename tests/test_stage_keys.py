"""Cache keys are pinned: a key that changes invalidates every user's cache, so it changes only on purpose.

The expected digests were computed by the key payloads as they were before the stage layer existed
(one payload per stage, written inline in the old pipeline); the runtime quality key is the one
deliberate change: it now names the llama-cpp-python version that scores the pair."""

from __future__ import annotations

import hashlib
import json

from exporter import stage_keys as keys
from exporter.stage_cache import stage_key

VERSIONS = {
    "edge-export": "0.1.0",
    "torch": "2.13.0",
    "safetensors": "0.8.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "llama-cpp-python": "0.3.36",
}
INPUTS = {
    "base": {"config.json": "a" * 64, "model.safetensors": "b" * 64},
    "adapters": [{"files": {"adapter_config.json": "c" * 64}, "weight": 1.0}],
}
OVERRIDES = {"tensor_types": {"output.weight": "Q6_K"}}
PINNED = {
    "merge": "45bdc435479f07f9885f35b8879e60c5bf0e8f91bcf18d26ed63675a5308719d",
    "convert": "49e8fce4629486877ddfeaa5d839819a66a44128ae965074e5625253b279edc9",
    "chat": "76c51fa834a02c1b8580bf1b665e81451011b8b212e098e22f60a96d13cbfc93",
    "stops": "ea7c550c71d8ba9420a2d4cc94e63ea5064cf53bbc307ac0e583b909d164e89d",
    "parity": "eeb8d41ba9cad4516df6e56dbaa773f3f2ce84b6d52c0a6a3b6103029309db1b",
    "quantize": "5bd278b66afb01114d909919c6e8031656c70e3ecdaf0c2e43e398203a25e48b",
    "quantize-imatrix": "3d726c1545b2e7400b214cf3cbb1e9eb48f4338f4112fd125192186cb6693b58",
    "imatrix": "450922762048a393440837a7bcf8a7dbfb998b43af2913bde92709325e19fad9",
    "imatrix-given": "63470da5bc584e81409a5bc8d5ba85c725ceabcf22c19249a7c916af21ae82cc",
    "quality": "880046c29cb55a26dea92f422031d127224738365be7a8625a24b19eb4d9d3be",
    "convert-base": "14eea32826bf9b470818f8d3bb691044e091a93688db8269c0969d47c8ca31ec",
    "quantize-base": "c70a084e1a2842486b7cf97405c26f69eb693c7b51b5f5858c2866e408df641f",
    "lora": "2a243fb9cb08cffa6d7ed1e5c6af4a87b95984867656bb5bdd7cd821c262049d",
    "reference": "44ede0ba022913895d0cb2d92dcde103167e36e5d8767f0df1eda5ce39956f07",
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
        "parity": keys.parity_key(convert, "0.1.0"),
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


def test_keys_depend_on_what_they_name():
    merge = keys.merge_key(INPUTS, None, VERSIONS)
    assert keys.merge_key(INPUTS, "bfloat16", VERSIONS) != merge
    assert keys.merge_key(INPUTS, None, {**VERSIONS, "torch": "2.14.0"}) != merge
    weighted = json.loads(json.dumps(INPUTS))
    weighted["adapters"][0]["weight"] = 0.5
    assert keys.merge_key(weighted, None, VERSIONS) != merge
    assert hashlib.sha256(b"x").hexdigest() not in computed().values()
