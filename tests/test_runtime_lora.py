"""The runtime-LoRA path: refusals and scale corrections on tiny models, then the real demo model
through the real converter, quantizer and llama.cpp runtime LoRA against the unmerged PEFT reference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from exporter.core.errors import InputError
from exporter.inputs.adapter import read_adapter
from exporter.merge.runtime_adapter import check_pair, runtime_correction
from tests.conftest import DEMO_EVAL, DemoExport, DemoInputs, RuntimeExport, run_cli, runtime_lora_args
from tests.tiny import make_adapter, make_tiny_llama

# ------------------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("rt-tiny") / "base", tie=True)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "ties the two"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "ties the two"),
        ({"bias": "lora_only"}, "biases"),
    ],
)
def test_what_cannot_run_at_runtime_is_refused(
    tiny_base: Path, tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    adapter = make_adapter(tiny_base, tmp_path / "adapter", perturb=True, **options)
    with pytest.raises(InputError) as error:
        runtime_correction(read_adapter(adapter), tiny_base)
    assert expected in str(error.value)
    assert "merge-quantize" in str(error.value)


def test_scale_corrections_fold_peft_scaling_into_lora_b(tiny_base: Path, tmp_path: Path) -> None:
    plain = runtime_correction(
        read_adapter(make_adapter(tiny_base, tmp_path / "plain", r=4, lora_alpha=8)), tiny_base
    )
    assert set(plain.factors.values()) == {1.0} and plain.corrected_modules == 0

    rs = make_adapter(tiny_base, tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True)
    rs_correction = runtime_correction(read_adapter(rs), tiny_base)
    # PEFT: 8/√4 = 4; llama.cpp: 8/4 = 2; factor 2 = √r
    assert all(math.isclose(f, 2.0) for f in rs_correction.factors.values())
    assert rs_correction.reasons == ("use_rslora",)

    patterned = make_adapter(
        tiny_base,
        tmp_path / "pattern",
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 32},
    )
    factors = runtime_correction(read_adapter(patterned), tiny_base).factors
    q = factors["model.layers.0.self_attn.q_proj"]
    v = factors["model.layers.0.self_attn.v_proj"]
    k = factors["model.layers.0.self_attn.k_proj"]
    assert (q, v, k) == (4.0, 1.0, 1.0)  # 32/4 over 8/4; rank_pattern alone is read from the shapes


def test_adapter_for_another_base_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    other = make_tiny_llama(tmp_path / "other", hidden=96)
    adapter = make_adapter(tiny_base, tmp_path / "adapter")
    with pytest.raises(InputError, match="different base|was trained on"):
        runtime_correction(read_adapter(adapter), other)


def test_dora_refused_through_the_command_line(demo_inputs: DemoInputs, tmp_path: Path) -> None:
    adapter = tmp_path / "dora"
    shutil.copytree(demo_inputs.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    out = tmp_path / "out"
    proc = run_cli(
        "runtime-lora", "--adapter", str(adapter), "--base", str(demo_inputs.base), "--out", str(out)
    )
    assert proc.returncode == 2, proc.stderr
    assert "DoRA" in proc.stderr and "merge-quantize" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------- the real demo model


def test_two_adapters_share_one_base_file_per_profile(runtime_export: RuntimeExport) -> None:
    out = runtime_export.out
    assert sorted(p.name for p in out.glob("*.gguf")) == [
        "pirate-alpha.lora.gguf",
        "pirate-rslora.lora.gguf",
        "smollm2-F16.gguf",
        "smollm2-Q4_K_M.gguf",
    ]
    # Ollama 0.34.1 (the default target) refuses ADAPTER Modelfiles: llama-server configs instead
    assert not list(out.glob("*.Modelfile"))
    assert "refuses Modelfiles with ADAPTER" in runtime_export.stdout
    config = json.loads((out / "smollm2-Q4_K_M.llama-server.json").read_text())
    assert config["shell"] == (
        "llama-server -m ./smollm2-Q4_K_M.gguf --jinja --host 127.0.0.1 --port 8080 -c 4096 "
        "--lora ./pirate-rslora.lora.gguf --lora ./pirate-alpha.lora.gguf --lora-init-without-apply"
    )
    assert config["requests"]["pirate-alpha"]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["llama_server"] == ["smollm2-F16.llama-server.json", "smollm2-Q4_K_M.llama-server.json"]
    assert [b["profile"] for b in manifest["bases"]] == ["F16", "Q4_K_M"]
    assert {a["name"]: a["corrected_modules"] for a in manifest["adapters"]} == {
        "pirate-rslora": 210,  # every LoRA module: 30 layers × 7
        "pirate-alpha": 60,  # q_proj and down_proj of 30 layers
    }


def test_adapter_modelfiles_for_ollama_before_0_34_1(
    runtime_export: RuntimeExport, demo_inputs: DemoInputs, tmp_path: Path
) -> None:
    from exporter.deploy.modelfile_check import parse_modelfile

    out = tmp_path / "out"
    args = runtime_lora_args(demo_inputs, runtime_export.adapters, out)
    proc = run_cli(*args, "--no-check", "--ollama-version", "0.33.0")  # every stage but the Modelfiles cached
    assert proc.returncode == 0, proc.stderr + proc.stdout
    modelfiles = sorted(out.glob("*.Modelfile"))
    assert len(modelfiles) == 4
    text = (out / "pirate-rslora-Q4_K_M.Modelfile").read_text()
    assert "FROM ./smollm2-Q4_K_M.gguf\nADAPTER ./pirate-rslora.lora.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE" in text
    assert "# for Ollama 0.33.0: renders with go_template" in text
    for modelfile in modelfiles:
        assert parse_modelfile(modelfile)[1] == []


def _uncorrected_kld(
    runtime_export: RuntimeExport, demo_inputs: DemoInputs, name: str, tmp_path: Path
) -> float:
    """What llama.cpp's converter alone gives: the same adapter converted without our correction."""
    from converters.lora_to_gguf import convert_lora_to_gguf
    from converters.vendor import locate_vendored
    from exporter.engine.run import Run
    from exporter.inputs.options import QualityOptions, RunOptions
    from exporter.inputs.records import ModelInputs
    from exporter.quality.reference import evaluate_gguf
    from exporter.stages.quality import reference_stage

    adapter = read_adapter(runtime_export.adapters[name])
    plain = tmp_path / f"{name}-uncorrected.gguf"
    convert_lora_to_gguf(
        adapter.path, adapter.config, adapter.weights, demo_inputs.base, plain, locate_vendored(), {}, {}
    )
    options = QualityOptions(eval_data=DEMO_EVAL)
    with Run.open(tmp_path / "scratch", RunOptions()) as run:
        inputs = ModelInputs.hashed(demo_inputs.base, (adapter,))
        reference = reference_stage(run, inputs, demo_inputs.base, options)
    assert reference.cached  # the same reference the command used
    return float(
        evaluate_gguf(runtime_export.out / "smollm2-F16.gguf", reference, options, lora=plain)["mean_kld"]
    )


@pytest.mark.parametrize("name", ["pirate-rslora", "pirate-alpha"])
def test_runtime_adapter_matches_peft_at_f16_only_with_the_correction(
    runtime_export: RuntimeExport, demo_inputs: DemoInputs, name: str, tmp_path: Path
) -> None:
    metrics = runtime_export.pair(name, "F16")["runtime"]["metrics"]
    uncorrected = _uncorrected_kld(runtime_export, demo_inputs, name, tmp_path)
    message = f"{name} at F16: corrected mean KLD {metrics['mean_kld']:.3g}, uncorrected {uncorrected:.3g}"
    print(message)
    assert metrics["mean_kld"] <= 1e-4, message
    assert metrics["top1"] >= 0.995, message
    assert uncorrected > 100 * 1e-4, message  # the converter alone is far off


def test_quantized_pair_is_checked_like_a_merged_gguf(runtime_export: RuntimeExport) -> None:
    report = runtime_export.report
    for name in runtime_export.adapters:
        runtime = runtime_export.pair(name, "Q4_K_M")["runtime"]
        metrics = runtime["metrics"]
        assert runtime["gates_passed"]
        assert 1e-4 < metrics["mean_kld"] < report["base_floor"][name]["mean_kld"] / 10
        assert metrics["generate_tokens_per_s"] > 0
        assert runtime["size_bytes"] < (runtime_export.out / "smollm2-F16.gguf").stat().st_size
    assert "runtime adapter vs merge-then-quantize" in runtime_export.stdout


def test_adapter_records_its_base_and_refuses_another(
    runtime_export: RuntimeExport, demo_export: DemoExport
) -> None:
    from converters.gguf_header import read_gguf_metadata

    out = runtime_export.out
    adapter = out / "pirate-rslora.lora.gguf"
    recorded, _ = read_gguf_metadata(adapter, ("edge_export.base.uuid", "edge_export.base.architecture"))
    base, _ = read_gguf_metadata(out / "smollm2-Q4_K_M.gguf", ("general.uuid",))
    assert recorded["edge_export.base.uuid"] == base["general.uuid"]  # kept through quantization
    assert recorded["edge_export.base.architecture"] == "llama"
    check_pair(adapter, out / "smollm2-Q4_K_M.gguf")
    # Same architecture and shapes, another model: the merged fine-tune's GGUF.
    with pytest.raises(InputError, match="made for another base"):
        check_pair(adapter, demo_export.gguf("Q4_K_M"))
