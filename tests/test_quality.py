"""The quality check: metrics, gates, reports and `edge-export check`, on the real demo export."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from converters.metrics import compare_rows, log_softmax, reference_rows, summarize
from exporter.core.errors import InputError
from exporter.inputs.evaldata import load_eval_data
from exporter.inputs.options import parse_gate_overrides
from exporter.quality.reference import apply_gates
from quant_profiles import builtin_profiles
from tests.conftest import DemoExport, copy_export, run_cli


def rows_by_label(report: dict) -> dict[str, dict]:
    return {row["label"]: row["metrics"] for row in report["artifacts"]}


def test_merged_f16_gguf_is_lossless_against_the_unmerged_model(demo_export: DemoExport):
    f16 = rows_by_label(demo_export.report)["F16"]
    assert f16["mean_kld"] <= 1e-4, f16
    assert f16["top1"] >= 0.995, f16
    assert f16["greedy_match"] == 1.0, f16
    assert abs(f16["ln_ppl_ratio"]) < 0.005


def test_quality_follows_the_bits(demo_export: DemoExport):
    rows = rows_by_label(demo_export.report)
    assert (
        rows["F16"]["mean_kld"]
        < rows["Q8_0"]["mean_kld"]
        < rows["Q4_K_M"]["mean_kld"]
        < rows["Q2_K"]["mean_kld"]
    )
    assert rows["Q8_0"]["top1"] > rows["Q4_K_M"]["top1"] > rows["Q2_K"]["top1"]


def test_base_without_adapter_is_clearly_worse_on_the_adapters_data(demo_export: DemoExport):
    report = demo_export.report
    floor = report["base_floor"]["metrics"]
    for label, metrics in rows_by_label(report).items():
        assert floor["mean_kld"] > 3 * metrics["mean_kld"], label
        assert floor["top1"] < metrics["top1"] - 0.2, label
        assert metrics["adapter_effect_kept"] > 0.7, label
    assert floor["greedy_match"] == 0.0


def test_reports_are_written_and_readable(demo_export: DemoExport):
    report = demo_export.report
    assert report["passed"] is True
    assert report["reference"]["scored_tokens"] > 500
    assert [row["label"] for row in report["artifacts"]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    markdown = (demo_export.out / "report.md").read_text()
    assert "| Q4_K_M | smollm2-pirate-Q4_K_M.gguf |" in markdown and "base (no adapter)" in markdown
    png = (demo_export.out / "quality.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert demo_export.manifest["quality"] == {"report": "report.json", "passed": True}
    assert "quality against the unmerged fine-tune" in demo_export.stdout


def test_check_command_for_ci(demo_export: DemoExport, tmp_path: Path):
    baseline = tmp_path / "baseline.json"
    baseline.write_text((demo_export.out / "report.json").read_text())
    junit = tmp_path / "junit.xml"
    proc = run_check(
        demo_export,
        tmp_path,
        "--baseline",
        str(baseline),
        "--junit",
        str(junit),
        "--gate",
        "Q2_K:max_mean_kld=0.01",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed quality gates" in proc.stderr and "Q2_K" in proc.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    failures = [case for case in suite.iter("testcase") if case.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failures] == [("edge-export.Q2_K", "max_mean_kld")]
    baseline_cases = [c for c in suite.iter("testcase") if c.get("name", "").startswith("baseline")]
    assert len(baseline_cases) == 8  # mean_kld and top1 for four artifacts, all within tolerance
    assert int(suite.get("tests")) == 16 and int(suite.get("failures")) == 1


def test_check_refuses_an_artifact_changed_after_export(demo_export: DemoExport, tmp_path: Path):
    manifest = json.loads((demo_export.out / "manifest.json").read_text())
    copy = tmp_path / "export"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for record in [*manifest["intermediates"], *manifest["artifacts"]]:
        (copy / record["path"]).symlink_to(demo_export.out / record["path"])
    (copy / manifest["artifacts"][0]["path"]).unlink()
    (copy / manifest["artifacts"][0]["path"]).write_bytes(b"GGUF not really")
    proc = run_cli("check", "--manifest", str(copy / "manifest.json"))
    assert proc.returncode == 2
    assert "has changed since" in proc.stderr


def test_kld_of_identical_distributions_is_zero_and_matches_the_exact_value():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    ids = rng.integers(0, 50, size=6)
    lp = log_softmax(logits)
    reference = reference_rows(lp, ids, k=50)
    same = compare_rows(lp, ids, reference["idx"], reference["lp"])
    assert np.allclose(same["kld"], 0, atol=1e-6) and same["same_top"].all()
    other = log_softmax(logits + rng.normal(size=logits.shape).astype(np.float32))
    full = compare_rows(other, ids, reference["idx"], reference["lp"])
    exact = (np.exp(lp[:-1]) * (lp[:-1] - other[:-1])).sum(axis=1)
    assert np.allclose(full["kld"], exact, atol=1e-5)
    truncated = reference_rows(lp, ids, k=5)
    bounded = compare_rows(other, ids, truncated["idx"], truncated["lp"])
    assert (bounded["kld"] <= exact + 1e-6).all() and (bounded["kld"] > 0.3 * exact).all()
    summary = summarize(full["kld"], full["same_top"], full["nll"], reference["nll"])
    assert math.isclose(
        summary["ln_ppl_ratio"], float(full["nll"].mean() - reference["nll"].mean()), rel_tol=1e-5
    )


def test_gate_overrides():
    q4 = builtin_profiles().get("Q4_K_M")
    overrides = parse_gate_overrides(("max_mean_kld=0.5", "Q4_K_M:min_top1=0.95", "Q8_0:min_top1=0.1"))
    gates = {g.gate: g for g in apply_gates(q4, {"mean_kld": 0.3, "top1": 0.9}, overrides)}
    assert gates["max_mean_kld"].limit == 0.5 and gates["max_mean_kld"].passed
    assert gates["min_top1"].limit == 0.95 and not gates["min_top1"].passed
    for bad in ("max_kld=1", "max_mean_kld", "min_top1=high"):
        with pytest.raises(InputError, match="--gate"):
            parse_gate_overrides((bad,))


def test_eval_data_errors(tmp_path: Path, demo_inputs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_inputs.base)
    empty = tmp_path / "empty.txt"
    empty.write_text("hi")
    with pytest.raises(InputError, match="fewer than 16 tokens"):
        load_eval_data(empty, tokenizer)
    broken = tmp_path / "chat.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{oops\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_eval_data(broken, tokenizer)
    with pytest.raises(InputError, match="does not exist"):
        load_eval_data(tmp_path / "absent.txt", tokenizer)
    text = tmp_path / "long.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 100)
    data = load_eval_data(text, tokenizer)
    assert max(len(s) for s in data.sequences) == 256 and not data.prompts


def test_kld_from_raw_logits_equals_kld_from_log_probs():
    from converters.metrics import compare_logits

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(9, 300)) * 4).astype(np.float32)
    ids = rng.integers(0, 300, size=9)
    reference = reference_rows(
        log_softmax(logits + rng.normal(size=logits.shape).astype(np.float32)), ids, k=16
    )
    a = compare_rows(log_softmax(logits), ids, reference["idx"], reference["lp"])
    b = compare_logits(logits, ids, reference["idx"], reference["lp"])
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-5), key


def run_check(demo_export: DemoExport, tmp_path: Path, *options: str):
    """`edge-export check` of a copy of the demo export (check writes its reports next to the
    manifest) on the export's own evaluation data, with `options`."""
    manifest = copy_export(demo_export.out, tmp_path / "export") / "manifest.json"
    eval_data = demo_export.report["reference"]["eval_data"]
    return run_cli("check", "--manifest", str(manifest), "--eval-data", str(eval_data), *options)


def test_metal_evaluation_without_a_metal_build_is_a_clear_error(demo_export: DemoExport, tmp_path: Path):
    proc = run_check(demo_export, tmp_path, "--device", "metal")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "built without Metal" in " ".join(proc.stderr.split())


def test_a_failed_f16_gate_blames_the_merge_or_conversion(demo_export: DemoExport, tmp_path: Path):
    """The F16 GGUF is not quantized: when it misses its exactness gate, quantization is not the suspect."""
    proc = run_check(demo_export, tmp_path, "--gate", "F16:max_mean_kld=1e-9")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "F16: The F16 GGUF is not quantized" in message, message
    assert "comes from the merge, the rounding to 16 bits, the conversion" in message, message
    assert "Q8_0:" not in message
    # `check` reads no merged weights (released by the export), so it does not split the distance.
    assert "rounding_floor" not in json.dumps(
        json.loads(Path(tmp_path / "export" / "report.json").read_text())
    )


def test_eval_tokens_auto_keeps_the_whole_set_up_to_1_5b_weights_and_scales_down_above():
    from exporter.inputs.evaldata import EvalData, token_budget

    assert token_budget("auto", 1_200_000_000, 2418) is None
    assert token_budget("auto", 3_200_000_000, 2418) == 2418 * 15 // 32
    assert token_budget("auto", 8_000_000_000, 2418) == 512  # never fewer
    assert token_budget("all", 8_000_000_000, 2418) is None
    assert token_budget("700", 135_000_000, 2418) == 700
    windows = tuple(tuple(range(n, n + 65)) for n in range(40))  # 40 windows of 64 scored tokens
    data = EvalData("built-in", windows, ((1, 2),))
    assert data.within(None) is data and data.within(4000) is data
    chosen = data.within(600)
    assert chosen.sequences == windows[::4]  # spread over the set, not its first windows
    assert chosen.n_scored == 640 and chosen.prompts == data.prompts
    assert chosen.source == "built-in, one window in 4: 640 of 2560 tokens"
    assert chosen.fingerprint() != data.fingerprint()


def test_eval_tokens_scores_a_spread_subset_and_says_so(demo_export: DemoExport, tmp_path: Path):
    proc = run_check(demo_export, tmp_path, "--eval-tokens", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    full = demo_export.report["reference"]["scored_tokens"]
    assert 300 <= report["reference"]["scored_tokens"] < full
    assert f"of {full} tokens" in report["reference"]["eval_data"]
    for row in report["artifacts"]:
        assert row["metrics"]["tokens"] == report["reference"]["scored_tokens"], row["label"]
    # check drafts the reference's greedy answers with the export's F16 GGUF, as merge-quantize does
    assert report["reference"]["greedy_answers"].startswith("drafted by llama.cpp from the 16-bit GGUF")
    bad = run_check(demo_export, tmp_path / "bad", "--eval-tokens", "lots")
    assert bad.returncode == 2 and "--eval-tokens 'lots'" in bad.stderr
