"""The layer-streamed reference (exporter/quality/streamed.py) is the whole-model PEFT reference, to float32 noise,
on every architecture of the matrix: the same log-probabilities with the adapter and without it, the same
greedy continuations, while each decoder layer's weights are in memory only for its own forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.inputs.adapter import read_adapter
from exporter.inputs.evaldata import load_eval_data
from exporter.inputs.options import QualityOptions
from exporter.inputs.tokenizer import load_tokenizer
from exporter.quality import reference
from tests.arch_matrix import ARCHITECTURES, Architecture, build
from tests.conftest import DEMO_EVAL, REPO, DemoInputs

TRAIN = REPO / "exporter" / "data" / "demo_train.jsonl"


def _references(base: Path, adapter: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, list[str]]:
    """(streamed, whole) compute_reference results on three of the demo's held-out chats, and what was
    streamed (the names of the modules whose weights the hooks read)."""
    tokenizer = load_tokenizer(adapter if (adapter / "tokenizer.json").is_file() else base)
    eval_data = load_eval_data(DEMO_EVAL, tokenizer, n_prompts=3)
    eval_data = type(eval_data)(eval_data.source, eval_data.sequences[:3], eval_data.prompts)
    options = QualityOptions(max_new_tokens=8)
    adapters = [read_adapter(adapter)]
    streamed_reads: list[str] = []
    original = reference.StreamedWeights.read

    def counted(self: Any, name: str) -> Any:
        streamed_reads.append(name)
        return original(self, name)

    monkeypatch.setattr(reference.StreamedWeights, "read", counted)
    streamed = reference.compute_reference(base, adapters, eval_data, options)
    monkeypatch.setattr(reference, "unstreamable", lambda *_: "the whole model, for comparison")
    whole = reference.compute_reference(base, adapters, eval_data, options)
    return streamed, whole, streamed_reads


def _assert_same(streamed: Any, whole: Any) -> None:
    arrays, greedy, base_metrics, _ = streamed
    whole_arrays, whole_greedy, whole_base, _ = whole
    assert whole_base["mean_kld"] > 1e-3, (
        "the adapter must change the model for the comparison to mean anything"
    )
    # the top-k rows are ordered by log-prob: a near tie may swap two neighbours (gpt-oss's routers)
    same = arrays["idx"] == whole_arrays["idx"]
    assert same.mean() > 0.999
    np.testing.assert_allclose(arrays["lp"][same], whole_arrays["lp"][same], atol=2e-4)
    np.testing.assert_allclose(arrays["nll"], whole_arrays["nll"], atol=2e-4)
    assert base_metrics["mean_kld"] == pytest.approx(whole_base["mean_kld"], rel=1e-3, abs=1e-5)
    assert base_metrics["top1"] == pytest.approx(whole_base["top1"], abs=0.02)
    agree = sum(a == b for g, w in zip(greedy, whole_greedy, strict=True) for a, b in zip(g, w, strict=False))
    assert agree >= 0.9 * sum(min(len(g), len(w)) for g, w in zip(greedy, whole_greedy, strict=True))


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: a.slug)
def test_the_streamed_reference_is_the_whole_model_reference(
    architecture: Architecture, demo_inputs: DemoInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build(architecture, demo_inputs.base, TRAIN)
    streamed, whole, reads = _references(built.base, built.adapter, monkeypatch)
    _assert_same(streamed, whole)
    if not architecture.moe:  # transformers fuses the experts when loading: those bases load whole
        assert any(".layers.1." in name for name in reads), "the decoder layers were not streamed"


def test_the_demo_adapter_streams(demo_inputs: DemoInputs, monkeypatch: pytest.MonkeyPatch) -> None:
    streamed, whole, reads = _references(demo_inputs.base, demo_inputs.adapter, monkeypatch)
    _assert_same(streamed, whole)
    layers = {name.split(".layers.")[1].split(".")[0] for name in reads if ".layers." in name}
    assert len(layers) > 1


def test_max_memory_between_the_streamed_and_the_whole_reference_keeps_float32(
    demo_inputs: DemoInputs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.engine import memory

    adapters = [read_adapter(demo_inputs.adapter)]
    streamed = memory.estimate_reference(demo_inputs.base, adapters, "float32")
    assert "one layer at a time" in streamed.stage
    with monkeypatch.context() as whole_model:
        whole_model.setattr(memory, "streams", lambda *_: False)
        whole = memory.estimate_reference(demo_inputs.base, adapters, "float32")
    assert streamed.peak_bytes < whole.peak_bytes
    limit = (streamed.peak_bytes + whole.peak_bytes) // 2
    options, estimates = memory.fit_check(demo_inputs.base, adapters, QualityOptions(), limit, False, 0)
    assert options.reference_dtype == "float32"
    assert estimates[0].peak_bytes == streamed.peak_bytes


def test_max_memory_below_the_streamed_reference_is_refused_before_work(
    demo_inputs: DemoInputs, tmp_path: Path
) -> None:
    from tests.conftest import run_cli

    out = tmp_path / "out"
    proc = run_cli(
        "merge-quantize",
        "--adapter",
        str(demo_inputs.adapter),
        "--base",
        str(demo_inputs.base),
        "--out",
        str(out),
        "--profile",
        "Q8_0",
        "--max-memory",
        "520MB",
        "--reference-dtype",
        "bfloat16",
    )
    assert proc.returncode == 2, proc.stderr
    assert "one layer at a time" in proc.stderr and "--max-memory" in proc.stderr
    assert not out.exists()


def test_confirmed_drafts_are_the_reference_s_own_greedy_answers(
    demo_export, demo_inputs: DemoInputs
) -> None:
    """Speculative decoding of the streamed reference: from the F16 GGUF's drafts (llama.cpp) it confirms
    every answer in one pass over its layers; wrong drafts (the base's answers, or none) it corrects at
    their first wrong token and decodes on from there; either way the tokens are those the reference
    decodes itself."""
    import torch

    from converters.llama_runtime import greedy_generate
    from exporter.quality.streamed import batched_greedy, confirmed_greedy, stop_ids

    tokenizer = load_tokenizer(demo_inputs.base)
    # Three prompts, twelve tokens: each streamed decoding step reads every layer again, so the test keeps the
    # decodes short; the draft, the corrections and the undrafted case are all still exercised.
    eval_data = load_eval_data(DEMO_EVAL, tokenizer, n_prompts=3)
    options = QualityOptions(max_new_tokens=12)
    model, streamed = reference._reference_model(
        demo_inputs.base, [read_adapter(demo_inputs.adapter)], options
    )
    assert streamed is not None
    stops = set(stop_ids(model))
    new = options.max_new_tokens
    prompts = eval_data.prompts
    with torch.no_grad():
        decoded = batched_greedy(model, prompts, new, "cpu")
        f16 = greedy_generate(demo_export.gguf("F16"), prompts, new, n_ctx=1024)
        confirmed, corrected = confirmed_greedy(model, prompts, f16, new, stops, "cpu")
        assert confirmed == decoded and corrected == 0
        with model.disable_adapter():
            wrong = batched_greedy(model, prompts, new, "cpu")
        assert wrong != decoded
        fixed, corrected = confirmed_greedy(model, prompts, wrong, new, stops, "cpu")
        assert fixed == decoded and corrected > 0
        undrafted, corrected = confirmed_greedy(model, prompts, [[] for _ in prompts], new, stops, "cpu")
        # with no draft the pass finds each answer's first token (or its stop) and decoding does the rest
        assert undrafted == decoded and corrected == sum(1 for d in decoded if d)
