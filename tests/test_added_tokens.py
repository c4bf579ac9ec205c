"""Adapters that added tokens, through the real CLI: merged with their rows, converted with their tokens,
checked on text that uses them, generated and stopped by llama.cpp (inputs: tests/vocab_writer.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DemoExport, DemoInputs, run_cli, session_output
from tests.sideenv import cache_dir
from tests.vocab_writer import PLAIN_TOKEN, TOOL_ANSWER, TOOL_PROMPT, TOOL_TOKENS

WRITER = REPO / "tests" / "vocab_writer.py"
EVAL = REPO / "tests" / "data" / "added_tokens_eval.jsonl"
ROWS = 49216  # 49152 + the added tokens, padded to a multiple of 64 (or the padded base's own rows)
CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # gguf.TokenType
# scenario: (base folder, tied in the merged model)
SCENARIOS = {
    "chatml": ("base-plain", False),
    "untied": ("base-untied", False),
    "trainable": ("base-tied", True),
    "padded": ("base-padded", False),
}


def writer_output(demo_inputs: DemoInputs, label: str, run: Callable[[Path], None]) -> Path:
    """The writer's output, built once by `run(staging)` and cached by the writer's content."""
    sources = [WRITER, REPO / "tests" / "tiny.py", demo_inputs.base / "tokenizer.json"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    target = cache_dir() / "vocab" / f"{label}-{key}"
    if not (target / "recipe.py").is_file():
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        run(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


@pytest.fixture(scope="session")
def vocab_inputs(demo_inputs: DemoInputs) -> Path:
    """Bases and adapters of tests/vocab_writer.py, trained by this environment's PEFT."""

    def run(staging: Path) -> None:
        command = [sys.executable, str(WRITER), str(staging), str(demo_inputs.base)]
        proc = subprocess.run(command, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]

    return writer_output(demo_inputs, "added-tokens", run)


@dataclass(frozen=True)
class Exported:
    scenario: str
    adapter: Path
    out: Path
    stdout: str

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.out / "report.json").read_text())

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.out / "manifest.json").read_text())

    def metrics(self, label: str) -> dict[str, Any]:
        return next(row for row in self.report["artifacts"] if row["label"] == label)["metrics"]


def export_args(inputs: Path, scenario: str, out: Path) -> list[str]:
    base = inputs / SCENARIOS[scenario][0]
    # A tiny random model's top-1 is not a quality measure: the test asserts KLD instead.
    return [
        "merge-quantize", "--adapter", str(inputs / scenario), "--base", str(base), "--name", scenario,
        "--profile", "Q8_0", "--gate", "min_top1=0.5", "--out", str(out), "--eval-data", str(EVAL),
        "--keep-merged",  # the merged weights are read below
    ]  # fmt: skip


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def exported(request: pytest.FixtureRequest, vocab_inputs: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(f"added-{request.param}") / "out"
    proc = run_cli(*export_args(vocab_inputs, request.param, out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Exported(request.param, vocab_inputs / request.param, session_output(out), proc.stdout)


def gguf_vocab(path: Path) -> tuple[list[str], list[int], dict[str, int]]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    tokens = [
        bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data
    ]
    types = [
        int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data
    ]
    ids = {
        key.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): int(field.parts[field.data[0]][0])
        for key, field in fields.items()
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
    }
    return tokens, types, ids


def test_the_merge_matches_the_unmerged_model_on_text_with_the_new_tokens(exported: Exported):
    f16 = exported.metrics("F16")
    assert f16["mean_kld"] <= 1e-4, f16
    floor = exported.report["base_floor"]["metrics"]
    assert floor["mean_kld"] > 0.05, floor  # the adapter visibly moved the logits
    assert exported.report["passed"], exported.report["artifacts"]


def test_the_merged_model_keeps_every_row_and_ties_only_what_stays_one_matrix(exported: Exported):
    config = json.loads((exported.out / "merged" / "config.json").read_text())
    assert config["vocab_size"] == ROWS
    assert config["tie_word_embeddings"] is SCENARIOS[exported.scenario][1]
    from safetensors import safe_open

    with safe_open(str(exported.out / "merged" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        assert handle.get_slice("model.embed_tokens.weight").get_shape()[0] == ROWS
        assert ("lm_head.weight" in names) is not SCENARIOS[exported.scenario][1]


def test_every_added_token_is_in_the_gguf_with_its_type_and_padding_rows_are_unused(exported: Exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported.adapter)
    tokens, types, _ = gguf_vocab(exported.out / f"{exported.scenario}-Q8_0.gguf")
    assert len(tokens) == ROWS
    for token in TOOL_TOKENS:
        assert types[tokenizer.convert_tokens_to_ids(token)] == CONTROL, token
    plain = tokenizer.convert_tokens_to_ids(PLAIN_TOKEN)
    assert (tokens[plain], types[plain]) == (PLAIN_TOKEN, USER_DEFINED)
    assert set(types[len(tokenizer) :]) == {UNUSED}
    parity = exported.manifest["tokenizer_parity"]
    assert parity["passed"] and parity["added_tokens"] >= 3, parity


def test_llama_cpp_emits_the_new_tokens_and_stops_at_the_new_end_of_turn(vocab_inputs: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from converters.llama_runtime import greedy_generate

    out = tmp_path / "out"
    proc = run_cli(*export_args(vocab_inputs, "chatml", out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(vocab_inputs / "chatml")
    gguf = out / "chatml-F16.gguf"
    _, _, ids = gguf_vocab(gguf)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids["eos"] == end_of_turn
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": TOOL_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    [generated] = greedy_generate(gguf, [tokenizer(prompt, add_special_tokens=False)["input_ids"]], 40)
    assert generated[: len(tokenizer(TOOL_ANSWER)["input_ids"])] == tokenizer(TOOL_ANSWER)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in generated
    # It stops at <|im_end|> (an end-of-generation token), long before the 40-token limit.
    assert len(generated) <= len(tokenizer(TOOL_ANSWER)["input_ids"]) + 1, tokenizer.decode(generated)
    modelfile = (out / "chatml-Q8_0.Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>" in modelfile


def test_a_resized_vocabulary_without_saved_output_rows_is_refused(vocab_inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = export_args(vocab_inputs, "untied", out)
    args[args.index(str(vocab_inputs / "untied"))] = str(vocab_inputs / "embed_lora")
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "lm_head.weight" in message and "modules_to_save" in message, message
    assert not out.exists()


def test_runtime_lora_refuses_a_changed_vocabulary(vocab_inputs: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = run_cli(
        "runtime-lora", "--adapter", str(vocab_inputs / "padded"), "--base", str(vocab_inputs / "base-padded"),
        "--profile", "Q8_0", "--out", str(out), "--no-check",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "changes the vocabulary" in message and "merge-quantize" in message, message
    assert not out.exists()


def test_parity_fails_a_gguf_that_lost_the_added_tokens(vocab_inputs: Path, demo_export: DemoExport):
    """The adapter's tokenizer against a GGUF converted without its tokens: every new token is caught."""
    from exporter.quality.tokenizer_parity import check_tokenizer_parity

    report = check_tokenizer_parity(vocab_inputs / "untied", demo_export.gguf("Q8_0"))
    lost = {m["token"] for m in report.added_mismatches}
    assert {*TOOL_TOKENS, PLAIN_TOKEN} <= lost
    assert not report.passed and "loses added tokens" in (report.added_token_error() or "")


def test_a_vocabulary_change_is_merged_only_on_its_own(vocab_inputs: Path, tmp_path: Path):
    from exporter.core.errors import InputError
    from exporter.inputs.adapter import read_adapter
    from exporter.merge import merge_adapters

    adapter = read_adapter(vocab_inputs / "untied")
    with pytest.raises(InputError, match="must be merged on its own"):
        merge_adapters(vocab_inputs / "base-untied", [adapter, adapter], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_tokenizer_with_more_tokens_than_rows_is_refused(vocab_inputs: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from exporter.core.errors import InputError
    from exporter.inputs.adapter import read_adapter
    from exporter.merge import merge_adapters

    adapter_dir = Path(shutil.copytree(vocab_inputs / "padded", tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.add_tokens([f"extra_token_{i}" for i in range(100)])  # past the 49216 padded rows
    tokenizer.save_pretrained(adapter_dir)
    with pytest.raises(InputError, match="has 49255 tokens, but the merged model has only 49216"):
        merge_adapters(vocab_inputs / "base-padded", [read_adapter(adapter_dir)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


OLDER_PEFT = "0.18.1"  # the other PEFT release the version matrix reads (tests/test_version_matrix.py)


@pytest.fixture(scope="session")
def older_peft_inputs(demo_inputs: DemoInputs) -> Path:
    """Two of the adapters trained and saved by PEFT 0.18.1 (a real install of it, first on the path)."""
    from tests.sideenv import side_env

    def run(staging: Path) -> None:
        env = side_env("5.23.0", OLDER_PEFT)
        env.run(str(WRITER), str(staging), str(demo_inputs.base), "untied,trainable", extra_path=(REPO,))

    return writer_output(demo_inputs, f"added-tokens-peft-{OLDER_PEFT}", run)


@pytest.mark.parametrize("scenario", ["untied", "trainable"])
def test_adapters_saved_by_an_older_peft_export_the_same_way(
    older_peft_inputs: Path, scenario: str, tmp_path: Path
):
    config = json.loads((older_peft_inputs / scenario / "adapter_config.json").read_text())
    assert config["peft_version"].startswith(OLDER_PEFT), config.get("peft_version")
    out = tmp_path / "out"
    proc = run_cli(*export_args(older_peft_inputs, scenario, out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    f16 = next(row for row in report["artifacts"] if row["label"] == "F16")["metrics"]
    assert f16["mean_kld"] <= 1e-4, f16
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert (merged["vocab_size"], merged["tie_word_embeddings"]) == (ROWS, SCENARIOS[scenario][1])
