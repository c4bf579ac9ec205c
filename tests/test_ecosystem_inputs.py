"""Inputs as today's tools write them, through the real pipeline: bf16 bases, KaSA adapters, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.gguf_header import read_gguf_header
from quant_profiles import LLAMA_FTYPES
from tests.conftest import DEMO_EVAL, REPO, DemoInputs, run_cli
from tests.tiny import make_adapter, make_tiny_smollm

BIG = 100_000.0  # beyond float16's ±65504, an ordinary bfloat16 value
BIG_WEIGHT = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def bf16_inputs(tmp_path_factory: pytest.TempPathFactory, demo_inputs: DemoInputs) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bf16")
    base = make_tiny_smollm(root / "base", demo_inputs.base, dtype=torch.bfloat16)
    weights = load_file(str(base / "model.safetensors"))
    weights[BIG_WEIGHT][0, 0] = BIG
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base, make_adapter(base, root / "adapter")


def test_bf16_base_beyond_float16_range_exports_through_a_32_bit_master(
    bf16_inputs: tuple[Path, Path], tmp_path: Path
):
    base, adapter = bf16_inputs
    out = tmp_path / "out"
    proc = run_cli(*export(adapter, base, out, "BF16", "Q8_0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "big-F32.gguf").is_file() and not (out / "big-F16.gguf").exists()
    assert read_gguf_header(out / "big-F32.gguf").file_type == LLAMA_FTYPES["F32"]
    assert read_gguf_header(out / "big-BF16.gguf").file_type == LLAMA_FTYPES["BF16"]  # quantized from F32
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert merged[BIG_WEIGHT].dtype == torch.float32 and merged[BIG_WEIGHT][0, 0].item() > 65504
    manifest = json.loads((out / "manifest.json").read_text())
    precision = manifest["precision"]
    assert (precision["merged"], precision["gguf"], precision["fits_float16"]) == ("float32", "F32", False)
    assert BIG_WEIGHT in precision["why"] and "32-bit master" in precision["why"], precision
    assert [a["profile"] for a in manifest["intermediates"]] == ["F32"]
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    # The master is the merged model: within the exactness gate; BF16 rounds every merged matrix.
    assert rows["F32"]["mean_kld"] <= 1e-3, rows  # the exactness gate (quant_profiles/F32.toml)
    assert rows["BF16"]["mean_kld"] > 3 * rows["F32"]["mean_kld"], rows
    assert report["passed"], report["artifacts"]


def test_bf16_base_within_float16_range_goes_to_f16_after_the_range_check(
    demo_inputs: DemoInputs, tmp_path: Path
):
    base = make_tiny_smollm(tmp_path / "base", demo_inputs.base, dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    proc = run_cli(*export(adapter, base, out, "Q8_0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["precision"]["merged"], manifest["precision"]["gguf"]) == ("float16", "F16")
    assert "fits float16" in manifest["precision"]["why"]
    report = json.loads((out / "report.json").read_text())
    f16 = next(row for row in report["artifacts"] if row["label"] == "F16")
    assert f16["metrics"]["mean_kld"] < 1e-4, f16  # float16 holds the merged ΔW; bfloat16 would not


def export(adapter: Path, base: Path, out: Path, *profiles: str) -> list[str]:
    """merge-quantize on a tiny model: top-1 agreement of a tiny random model is not a quality measure."""
    return [
        "merge-quantize", "--adapter", str(adapter), "--base", str(base), "--name", "big",
        *(arg for profile in profiles for arg in ("--profile", profile)),
        "--gate", "min_top1=0.5", "--out", str(out), "--eval-data", str(DEMO_EVAL),
        "--keep-merged",  # the merged weights are read below
    ]  # fmt: skip


def test_kasa_adapter_through_the_pipeline(demo_inputs: DemoInputs, tmp_path: Path):
    """A KaSA adapter exports and its F16 GGUF matches PEFT's unmerged KaSA model (base truncated)."""
    from peft import KasaConfig

    base = make_tiny_smollm(tmp_path / "base", demo_inputs.base)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, kasa_config=KasaConfig())
    out = tmp_path / "out"
    proc = run_cli(*export(adapter, base, out, "Q8_0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    f16 = next(row for row in report["artifacts"] if row["label"] == "F16")
    assert f16["metrics"]["mean_kld"] < 1e-4, f16
    assert report["base_floor"]["metrics"]["mean_kld"] > 100 * f16["metrics"]["mean_kld"]


def test_an_internal_error_is_not_a_failed_gate(tmp_path: Path):
    """Exit code 1 means a failed quality gate; a bug in edge-export exits 4, with its own message."""
    script = (
        "import sys, exporter.commands.merge_quantize as p\n"
        "def broken(*a, **k): raise RuntimeError('simulated bug')\n"
        "p.merge_quantize = broken\n"
        "from exporter.cli.app import main\n"
        f"sys.argv = ['edge-export', 'merge-quantize', '--adapter', {str(tmp_path)!r}, '--profile', 'Q8_0',"
        f" '--out', {str(tmp_path / 'out')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "internal error: RuntimeError: simulated bug" in " ".join(proc.stderr.split())


def test_a_whole_matrix_rewrite_splits_into_rounding_and_runtime(demo_inputs: DemoInputs, tmp_path: Path):
    """A KaSA adapter rewrites every targeted matrix (the base truncated by SVD): when the F16 GGUF fails its
    gate, the merged folder itself is scored in PyTorch (the 16-bit floor) and the diagnosis names the share
    of rounding and of conversion + runtime, instead of blaming the merge."""
    from peft import KasaConfig

    from exporter.quality.reference import DIFFERENT_MODEL, ROUNDING_SHARE

    base = make_tiny_smollm(tmp_path / "base", demo_inputs.base)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, kasa_config=KasaConfig())
    out = tmp_path / "out"
    args = [a for a in export(adapter, base, out, "Q8_0") if a != "--keep-merged"]
    proc = run_cli(*args, "--gate", "F16:max_mean_kld=1e-8")  # the F16 fails: its floor is measured
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row["metrics"] for row in report["artifacts"]}
    total, floor = rows["F16"]["mean_kld"], rows["F16"]["rounding_floor"]["mean_kld"]
    assert 0 < floor <= 1.5 * total, (
        floor,
        total,
    )  # the GGUF is the rounded merge plus llama.cpp's arithmetic
    assert "rounding_floor" not in rows["Q8_0"]  # measured for the unquantized file only
    message = " ".join(proc.stderr.split())
    assert f"is {floor:.3g} mean KLD from the unmerged model; the F16 GGUF is {total:.3g}" in message, message
    assert "comes from the merge" not in message
    if floor >= ROUNDING_SHARE * total:
        assert "Most of it is the rounding" in message, message
    else:
        assert total - floor < DIFFERENT_MODEL  # the same model: arithmetic, not a misread setting
        assert "sensitive to llama.cpp's own arithmetic" in message, message
    assert "(the merged folder scored in PyTorch: the 16-bit floor)" in (out / "report.md").read_text()
    assert not list((out / "merged").glob("*.safetensors"))  # released after the floor read them
