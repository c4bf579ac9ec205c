"""Importance matrices from --calibration: what is collected, and its use through the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.quality.imatrix import activation_dtype, collect_activations
from tests.conftest import REPO, DemoExport, DemoInputs, export_args, run_cli, session_output
from tests.tiny import make_tiny_llama

DEMO_TRAIN = REPO / "exporter" / "data" / "demo_train.jsonl"


def test_collected_statistics_are_sums_of_squared_layer_inputs(tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_llama(tmp_path / "base")
    sequences = [(1, 5, 9, 3, 7), (2, 4, 6)]
    stats = collect_activations(model_dir, sequences)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    expected = 0
    with torch.no_grad():
        for sequence in sequences:
            hidden = model.model.embed_tokens(torch.tensor([sequence]))
            expected = expected + (layer.input_layernorm(hidden).double() ** 2).sum(dim=(0, 1)).numpy()
    q_sum, q_count = stats["model.layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(q_sum, expected, rtol=1e-5)
    assert q_count == 8
    np.testing.assert_array_equal(stats["model.layers.0.self_attn.k_proj"][0], q_sum)  # same input
    assert "lm_head" not in stats and "model.layers.0.mlp.down_proj" in stats


@pytest.fixture(scope="session")
def imatrix_export(
    demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path_factory: pytest.TempPathFactory
):
    out = tmp_path_factory.mktemp("imatrix") / "smollm2"
    # fmt: off
    args = ["merge-quantize", "--adapter", str(demo_inputs.adapter), "--base", str(demo_inputs.base),
            "--name", "smollm2-pirate", "--profile", "Q4_K_M", "--profile", "IQ4_XS", "--out", str(out)]
    # fmt: on
    proc = run_cli(*args, "--no-check", "--calibration", str(DEMO_TRAIN), "--calibration-tokens", "1024")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return session_output(out), proc.stdout


def test_calibration_builds_a_matrix_that_reaches_the_quantizer(imatrix_export, demo_export: DemoExport):
    from gguf import GGUFReader

    out, stdout = imatrix_export
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["imatrix"]
    assert info["entries"] == 30 * 7 and info["skipped"] == [] and info["tokens"] <= 1024
    assert info["dtype"] == "float32"  # 135M parameters: float32 on any machine that runs the tests
    assert "importance matrix: smollm2-pirate.imatrix.gguf (210 tensors" in stdout
    matrix = GGUFReader(out / info["path"])
    assert matrix.fields["general.type"].contents() == "imatrix"
    names = {t.name for t in matrix.tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.29.ffn_down.weight.counts"} <= names
    for profile in ("Q4_K_M", "IQ4_XS"):
        fields = GGUFReader(out / f"smollm2-pirate-{profile}.gguf").fields
        assert fields["quantize.imatrix.entries_count"].contents() == 210
        assert fields["edge_export.imatrix.sha256"].contents() == info["sha256"]
        assert fields["quantize.imatrix.dataset"].contents() == DEMO_TRAIN.name
    # The matrix changes the quantized bytes; the conversion came from the shared cache. The matrix is
    # computed on the merged weights, which the shared export released once converted: merged again.
    q4 = next(a for a in manifest["artifacts"] if a["profile"] == "Q4_K_M")
    plain = next(a for a in demo_export.manifest["artifacts"] if a["profile"] == "Q4_K_M")
    assert q4["sha256"] != plain["sha256"]
    assert "convert" in manifest["cached_stages"]
    assert manifest["intermediates"][0]["sha256"] == demo_export.manifest["intermediates"][0]["sha256"]


def test_too_little_calibration_text_is_refused(demo_inputs: DemoInputs, tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("Arr, matey.\n")
    out = tmp_path / "out"
    args = export_args(demo_inputs, out)
    proc = run_cli(*args, "--no-check", "--calibration", str(short))
    assert proc.returncode == 2, proc.stderr
    assert str(short) in proc.stderr and "--calibration" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.gguf"))


def test_bench_widening_keeps_the_function_with_256_multiple_rows(tmp_path: Path):
    """bench/imatrix --aligned measures the k-quants on a widened twin of the model: it must compute
    what the original computes, and every weight row must be a multiple of 256 wide."""
    import importlib.util

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("bench_imatrix", REPO / "bench" / "imatrix.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    source = make_tiny_llama(tmp_path / "base", hidden=64, dtype=torch.float32)
    shape = bench.widen_to_k_quant_rows(source, tmp_path / "wide")
    assert shape == {"hidden": 256, "intermediate": 256, "heads": 16}
    for name, tensor in load_file(tmp_path / "wide" / "model.safetensors").items():
        assert tensor.shape[-1] % 256 == 0, name
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 8, 64, 5]])
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(ids).logits
        after = (
            AutoModelForCausalLM.from_pretrained(tmp_path / "wide", dtype=torch.float32).eval()(ids).logits
        )
    assert before.abs().max() > 0.05  # a test on all-zero logits would prove nothing
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_activation_precision_follows_installed_memory_not_free_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The matrix, and every GGUF quantized with it, must not depend on what else the machine runs."""
    import os

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)  # 1000 bytes of 16-bit weights
    pages = {"SC_PAGE_SIZE": 1, "SC_AVPHYS_PAGES": 10, "SC_PHYS_PAGES": 10_000}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert activation_dtype(tmp_path) == "float32"  # little free now, plenty installed
    pages["SC_PHYS_PAGES"] = 3000  # float32 (2000 bytes) would take two thirds of the machine
    assert activation_dtype(tmp_path) == "bfloat16"


def _write_imatrix(
    path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], kind: str = "imatrix"
) -> Path:
    """An importance-matrix GGUF in llama-imatrix's layout, written with the gguf package."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="llama")
    writer.add_type(kind)
    writer.add_array("imatrix.datasets", ["elsewhere.txt"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        writer.add_tensor(f"{name}.counts", counts.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_matrix_entries_are_divided_by_their_count_per_expert(tmp_path: Path):
    from converters.quantize import _imatrix_entries

    sums = np.array([[2, 4, 6, 8], [4, 8, 12, 16]])  # two experts, four input columns
    path = _write_imatrix(tmp_path / "m.gguf", {"blk.0.ffn_up_exps.weight": (sums, np.array([[2], [4]]))})
    ((name, means),) = _imatrix_entries(str(path))
    assert name == "blk.0.ffn_up_exps.weight"
    np.testing.assert_array_equal(means, [1, 2, 3, 4, 1, 2, 3, 4])


def test_a_given_matrix_quantizes_like_the_computed_one(
    imatrix_export, demo_inputs: DemoInputs, tmp_path: Path
):
    from gguf import GGUFReader

    from exporter.core.hashing import sha256_file

    computed_out, _ = imatrix_export
    given = computed_out / "smollm2-pirate.imatrix.gguf"
    out = tmp_path / "given"
    # fmt: off
    args = ["merge-quantize", "--adapter", str(demo_inputs.adapter), "--base", str(demo_inputs.base),
            "--name", "smollm2-pirate", "--profile", "Q4_K_M", "--profile", "IQ4_XS", "--out", str(out)]
    # fmt: on
    proc = run_cli(*args, "--no-check", "--imatrix", str(given))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"importance matrix: smollm2-pirate.imatrix.gguf (210 tensors, given: {given}" in proc.stdout
    info = json.loads((out / "manifest.json").read_text())["imatrix"]
    assert info["given"] == str(given) and info["entries"] == 210 and info["dataset"] == DEMO_TRAIN.name
    assert sha256_file(out / info["path"]) == sha256_file(given)
    for profile in ("Q4_K_M", "IQ4_XS"):
        ours = GGUFReader(out / f"smollm2-pirate-{profile}.gguf")
        computed = GGUFReader(computed_out / f"smollm2-pirate-{profile}.gguf")
        # The same matrix gives the same quantized tensors; only the provenance keys differ.
        assert [t.name for t in ours.tensors] == [t.name for t in computed.tensors]
        for a, b in zip(ours.tensors, computed.tensors, strict=True):
            assert a.data.tobytes() == b.data.tobytes(), a.name
        assert ours.fields["edge_export.imatrix.sha256"].contents() == info["sha256"]
        assert ours.fields["quantize.imatrix.dataset"].contents() == DEMO_TRAIN.name
        assert "edge_export.imatrix.calibration_sha256" not in ours.fields


def test_a_matrix_that_does_not_fit_is_refused(
    demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path: Path
):
    (tmp_path / "notes.txt").write_text("not a matrix\n")
    wrong = {"blk.0.attn_q.weight": (np.ones((1, 100)), np.ones((1, 1)))}  # SmolLM2's rows are 576 wide
    cases = {
        "text": (tmp_path / "notes.txt", "not a readable GGUF"),
        "model": (demo_export.gguf("Q8_0"), "not an importance matrix"),
        "other model": (_write_imatrix(tmp_path / "other.gguf", wrong), "100 values for 576 input columns"),
    }
    for case, (path, expected) in cases.items():
        out = tmp_path / case.replace(" ", "-")
        proc = run_cli(*export_args(demo_inputs, out), "--no-check", "--imatrix", str(path))
        assert proc.returncode == 2, (case, proc.stderr)
        message = " ".join(proc.stderr.split())  # the console wraps long lines
        assert str(path) in message and expected in message and "Traceback" not in message, case
        assert not (out / "manifest.json").exists() and not list(out.glob("*.gguf")), case
    out = tmp_path / "both"
    args = [*export_args(demo_inputs, out), "--imatrix", str(tmp_path / "other.gguf")]
    proc = run_cli(*args, "--calibration", str(DEMO_TRAIN))
    assert proc.returncode == 2 and "not both" in proc.stderr
