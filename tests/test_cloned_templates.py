"""TRL's clone_chat_template: a base given another family's chat format and added tokens. llama.cpp's
converter must still name the base's pre-tokenizer, and the GGUF must tokenize every added token as the
grown tokenizer does; a fine-tune of such a model exports through the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clone_fixture import GEMMA_PLAIN, cloned_folder, family_templates, trained_clone
from tests.conftest import DemoInputs, run_cli
from tests.tiny import make_tiny_smollm

# Families whose clone runs in `make test` (all 17 with --runslow): the one with whitespace runs among its
# added tokens, and one whose added tokens are only special ones.
IN_MAKE_TEST = {"gemma-instruct", "llama3-instruct"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, demo_inputs: DemoInputs) -> Path:
    return make_tiny_smollm(tmp_path_factory.mktemp("clone") / "base", demo_inputs.base)


@pytest.fixture(scope="module")
def base_pre_tokenizer(tiny_base: Path) -> str:
    """The pre-tokenizer llama.cpp's converter names for the base's own tokenizer."""
    from converters.gguf_header import read_gguf_metadata
    from converters.hf_to_gguf import convert_hf_to_gguf
    from converters.vendor import locate_vendored

    gguf = tiny_base.parent / "base-vocab.gguf"
    convert_hf_to_gguf(tiny_base, gguf, locate_vendored(), "base", vocab_only=True)
    return str(read_gguf_metadata(gguf, ("tokenizer.ggml.pre",))[0]["tokenizer.ggml.pre"])


def _families() -> list[object]:
    return [
        f if f in IN_MAKE_TEST else pytest.param(f, marks=pytest.mark.slow)
        for f in sorted(family_templates())
    ]


@pytest.mark.parametrize("family", _families())
def test_a_cloned_tokenizer_converts_with_the_base_pre_tokenizer(
    family: str, tiny_base: Path, base_pre_tokenizer: str, tmp_path: Path
):
    from converters.gguf_header import read_gguf_metadata
    from converters.hf_to_gguf import convert_hf_to_gguf
    from converters.pretokenizer import grown_from
    from converters.vendor import locate_vendored
    from exporter.inputs.tokenizer import load_tokenizer
    from exporter.quality.tokenizer_parity import check_tokenizer_parity

    folder = cloned_folder(tiny_base, family, family_templates()[family], tmp_path)
    tokenizer = load_tokenizer(folder)
    grown = grown_from(folder, tiny_base)
    base_added = len(load_tokenizer(tiny_base).added_tokens_decoder)
    assert grown == (len(tokenizer.added_tokens_decoder) - base_added or None)
    vendored = locate_vendored()
    gguf = tmp_path / "vocab.gguf"
    convert_hf_to_gguf(folder, gguf, vendored, "cloned", vocab_only=True, pre_tokenizer_from=tiny_base)
    assert read_gguf_metadata(gguf, ("tokenizer.ggml.pre",))[0]["tokenizer.ggml.pre"] == base_pre_tokenizer
    report = check_tokenizer_parity(folder, gguf)
    assert report.passed, report.summary()
    assert report.added_tokens == len(tokenizer.added_tokens_decoder)
    if family == "gemma-instruct":  # newline runs are in the text llama.cpp hashes: its table alone fails
        assert {"\n\n", "  ", "\t\t"} <= {t.content for t in tokenizer.added_tokens_decoder.values()}
        with pytest.raises(Exception, match="pre-tokenizer hash is not in the table"):
            convert_hf_to_gguf(folder, tmp_path / "plain.gguf", vendored, "cloned", vocab_only=True)
        assert not (tmp_path / "plain.gguf").exists()


def test_a_fine_tune_of_a_cloned_model_exports_through_the_pipeline(
    demo_inputs: DemoInputs, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
):
    tiny_base = make_tiny_smollm(tmp_path_factory.mktemp("untied") / "base", demo_inputs.base, tie=False)
    adapter = trained_clone(tiny_base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"], config
    out = tmp_path / "out"
    proc = run_cli(
        "merge-quantize", "--adapter", str(adapter), "--base", str(tiny_base), "--name", "cloned",
        "--profile", "F16", "--out", str(out), "--eval-tokens", "256",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stdout = " ".join(proc.stdout.split())
    assert f"the tokenizer is {tiny_base}'s with" in stdout, stdout
    added = len(GEMMA_PLAIN)
    assert "tokenizer parity: HF and llama.cpp agree" in stdout, stdout
    parity = json.loads((out / "manifest.json").read_text())["tokenizer_parity"]
    assert parity["passed"] and parity["added_tokens"] > added, parity
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    assert rows["F16"]["mean_kld"] <= 1e-4, rows["F16"]
    assert "<end_of_turn>" in (out / "cloned-F16.Modelfile").read_text()
