"""merge-quantize --fit: the search's parts on their own, then the real thing through the CLI on a body whose
rows take k-quants everywhere (tests/fit_fixture.py) and on the demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from converters.gguf_header import TensorInfo
from converters.hashing import sha256_file
from converters.tensor_types import BLOCKS, FileLayout, tensor_bytes, written_type
from exporter.quality.fit import BACKGROUND, band_edges, solve, tensor_groups, trial_count
from quant_profiles import GGML_TYPES, QuantProfile, load_profile_file
from tests.conftest import DEMO_EVAL, DemoInputs, run_cli

F16 = GGML_TYPES["F16"]


def test_type_sizes_are_ggmls() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, block in BLOCKS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == block, name


def test_written_type_follows_llama_cpps_fallback() -> None:
    assert written_type("Q4_K", 512) == "Q4_K"
    assert written_type("Q4_K", 576) == "Q5_0"  # SmolLM2-135M's rows
    assert written_type("Q3_K", 576) == "Q4_0"
    assert written_type("Q6_K", 576) == "Q8_0"
    assert written_type("Q8_0", 50) == "F16"
    assert tensor_bytes((512, 3), "Q4_K") == 2 * 144 * 3


def _tensor(name: str, cols: int = 256, rows: int = 256) -> TensorInfo:
    return TensorInfo(name, (cols, rows), F16)


def test_groups_by_kind_and_band() -> None:
    tensors = [_tensor("token_embd.weight")] + [
        _tensor(f"blk.{i}.{kind}.weight") for i in range(6) for kind in ("attn_q", "ffn_down")
    ]
    assert band_edges(6, 4) == [(0, 1), (2, 2), (3, 3), (4, 5)]
    assert band_edges(30, 3) == [(0, 9), (10, 19), (20, 29)]
    groups = tensor_groups(tensors, 2)
    assert [g.name for g in groups] == [
        "token_embd",
        "attn_q 0-2",
        "attn_q 3-5",
        "ffn_down 0-2",
        "ffn_down 3-5",
    ]
    assert [t.name for t in groups[1].tensors] == [f"blk.{i}.attn_q.weight" for i in range(3)]
    import re

    assert re.search(groups[1].pattern, "blk.2.attn_q.weight")
    assert not re.search(groups[1].pattern, "blk.12.attn_q.weight")  # whole names only
    assert trial_count(groups) == 1 + 5 * 6
    # 576-wide rows: Q2_K and Q3_K both become Q4_0, Q6_K becomes Q8_0 — one trial each, not three
    assert tensor_groups([_tensor("token_embd.weight", cols=576)], 1)[0].ladder == (
        "Q2_K",
        "Q4_K",
        "Q5_K",
        "Q8_0",
        "F16",
    )


def test_knapsack_is_the_best_mix_within_the_budget(tmp_path: Path) -> None:
    import itertools

    tensors = [_tensor(f"blk.0.{kind}.weight", rows=64 * (i + 1)) for i, kind in enumerate(("a", "b", "c"))]
    layout = FileLayout(tuple(tensors), overhead=1000)
    groups = tensor_groups(tensors, 1)
    costs: dict[str, dict[str, float]] = {}
    for i, g in enumerate(groups):  # cost falls with bytes, at a rate that differs per group
        costs[g.name] = {r: (i + 1) * 1000.0 / g.bytes(r) for r in g.ladder}
        costs[g.name][BACKGROUND] = 0.0
        costs[g.name] = {r: c - (i + 1) * 1000.0 / g.bytes(BACKGROUND) for r, c in costs[g.name].items()}
    for budget in (60_000, 80_000, 120_000):
        choice = solve(layout, groups, costs, 0.0, budget)
        assert choice.size_bytes <= budget
        best = min(
            sum(costs[g.name][r] for g, r in zip(groups, mix, strict=True))
            for mix in itertools.product(*(g.ladder for g in groups))
            if layout.size_with({g.tensors[0].name: r for g, r in zip(groups, mix, strict=True)}) <= budget
        )
        assert choice.predicted_kld == pytest.approx(best, abs=1e-9)


def test_fit_options_name_the_profile_and_the_budget() -> None:
    from exporter.inputs.options import FitOptions

    assert FitOptions("2.5GB", budget_bytes=2_684_354_560).label == "FIT-2.5GB"
    bpw = FitOptions("4.3", bits_per_weight=4.3)
    assert bpw.label == "FIT-4.3bpw" and bpw.budget_for(1_000_000) == 537_500


def _export(base: Path, adapter: Path, out: Path, *extra: str) -> Any:
    # fmt: off
    return run_cli("merge-quantize", "--adapter", str(adapter), "--base", str(base), "--name", "body",
                   "--out", str(out), "--eval-data", str(DEMO_EVAL), *extra)
    # fmt: on


@pytest.fixture(scope="module")
def body(demo_inputs: DemoInputs) -> tuple[Path, Path]:
    from tests.fit_fixture import fit_body

    return fit_body(demo_inputs.base)


@pytest.fixture(scope="module")
def fitted(
    body: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], int]:
    """The body's uniform Q3_K_M, Q4_K_M and Q5_K_M, and the fit to the size of Q4_K_M."""
    uniform = ("--profile", "Q3_K_M", "--profile", "Q4_K_M", "--profile", "Q5_K_M")
    sizes = tmp_path_factory.mktemp("fit-sizes") / "out"
    proc = _export(*body, sizes, *uniform, "--no-check")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    budget = (sizes / "body-Q4_K_M.gguf").stat().st_size
    out = tmp_path_factory.mktemp("fit") / "out"
    proc = _export(*body, out, *uniform, "--fit", str(budget), "--fit-trials", "50")
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout  # 1: a uniform profile failed its gates
    return out, json.loads((out / "report.json").read_text()), budget


def test_fitted_file_fits_and_beats_every_uniform_profile_that_fits_on_held_out_text(
    fitted: tuple[Path, dict[str, Any], int],
) -> None:
    out, report, budget = fitted
    rows = {row["label"]: row for row in report["artifacts"]}
    label = f"FIT-{budget}"
    fit = rows[label]
    assert fit["size_bytes"] <= budget
    assert (
        (out / f"body-{label}.gguf").stat().st_size == fit["size_bytes"] == report["fit"]["predicted_bytes"]
    )
    assert report["fit"]["searched_windows"] and report["fit"]["held_out_windows"]
    assert not set(report["fit"]["searched_windows"]) & set(report["fit"]["held_out_windows"])
    rivals = [r for name, r in rows.items() if name != label and r["size_bytes"] <= budget and name != "F16"]
    assert {r["label"] for r in rivals} >= {"Q3_K_M", "Q4_K_M"}
    for rival in rivals:
        assert fit["metrics"]["held_out_mean_kld"] < rival["metrics"]["held_out_mean_kld"], rival["label"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fit"]["profile_file"]["path"] == f"body-{label}.profile.toml"
    assert "Fitted to" in (out / "report.md").read_text()


def test_profile_file_rebuilds_the_fitted_gguf_byte_for_byte(
    body: tuple[Path, Path], fitted: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    out, report, budget = fitted
    label = f"FIT-{budget}"
    profile_file = shutil.copy(out / f"body-{label}.profile.toml", tmp_path / "fit.toml")
    profile: QuantProfile = load_profile_file(Path(profile_file))
    assert profile.name == label and len(profile.overrides.tensor_types) == len(report["fit"]["groups"])
    again = tmp_path / "again"
    proc = _export(*body, again, "--profile-file", str(profile_file), "--no-check", "--no-cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sha256_file(again / f"body-{label}.gguf") == sha256_file(out / f"body-{label}.gguf")


def test_budgets_out_of_reach_are_refused_and_leave_nothing(
    body: tuple[Path, Path], fitted: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    _, report, _ = fitted
    out = tmp_path / "out"
    proc = _export(*body, out, "--fit", "1MB")  # refused from the base's headers, before any work
    assert proc.returncode == 2 and "out of reach" in proc.stderr and not out.exists()
    proc = _export(*body, out, "--fit", "2GB")  # above the F16 file
    assert proc.returncode == 2 and "--profile F16" in proc.stderr and not out.exists()
    proc = _export(*body, out, "--fit-bpw", "2")  # bits per weight of the file: below Q2_K everywhere
    assert proc.returncode == 2 and "--fit-bpw 2 (" in proc.stderr and not out.exists(), proc.stderr
    proc = _export(*body, out, "--fit-bpw", "0.5")
    assert proc.returncode == 2 and "between 1 and 16" in proc.stderr and not out.exists()
    below = report["fit"]["reach"]["smallest"] - 1  # passes the estimate; the exact sizes refuse it
    proc = _export(*body, out, "--fit", str(below), "--fit-trials", "50")
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert f"{report['fit']['reach']['smallest']} bytes" in proc.stderr
    assert not any(out.glob("*.gguf")) and not (out / "manifest.json").exists()


def test_fit_on_the_demo_model(demo_inputs: DemoInputs, tmp_path: Path) -> None:
    """SmolLM2-135M: 576-wide rows, so most rungs fall back to 32-block types; one band of layers. The uniform
    profiles are the demo export's own (a profile no other test asks for would be cached for them)."""
    out = tmp_path / "demo"
    budget = "104MiB"  # between Q4_K_M (100.6 MiB) and Q5_K_M (106.9 MiB)
    # fmt: off
    proc = run_cli("merge-quantize", "--adapter", str(demo_inputs.adapter), "--base", str(demo_inputs.base),
                   "--name", "smollm2-pirate", "--profile", "Q4_K_M", "--profile", "Q2_K", "--fit", budget,
                   "--fit-trials", "40", "--out", str(out), "--eval-data", str(DEMO_EVAL))
    # fmt: on
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row for row in report["artifacts"]}
    fit = rows[f"FIT-{budget}"]
    assert rows["Q4_K_M"]["size_bytes"] < fit["size_bytes"] <= 104 * 2**20
    assert report["fit"]["bands"] == 1
    for rival in ("Q4_K_M", "Q2_K"):
        assert fit["metrics"]["held_out_mean_kld"] < rows[rival]["metrics"]["held_out_mean_kld"], rival
    assert fit["footprint"]["kv_bytes"] > 0  # its row gives memory and speed like every other
    assert fit["metrics"]["generate_tokens_per_s"] > 0


def test_batch_plan_entry_with_fit(
    body: tuple[Path, Path], fitted: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    """fit in a batch plan: the same search (every trial from the cache), one more row in the batch report."""
    out, _, budget = fitted
    base, adapter = body
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'out = "{tmp_path / "batch-out"}"\nprofiles = ["Q4_K_M"]\neval_data = "{DEMO_EVAL}"\n'
        f'[bases.body]\npath = "{base}"\n'
        f'[[adapters]]\nname = "body"\npath = "{adapter}"\nfit = "{budget}"\nfit_trials = 50\n'
    )
    proc = run_cli("batch", str(plan))
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout
    rows = json.loads((tmp_path / "batch-out" / "batch-report.json").read_text())["rows"]
    fitted_row = next(r for r in rows if r["profile"] == f"FIT-{budget}")
    assert fitted_row["sha256"][0] == sha256_file(out / f"body-FIT-{budget}.gguf")
    bad = tmp_path / "bad.toml"
    bad.write_text(plan.read_text().replace(f'fit = "{budget}"', 'fit = "lots"'))
    proc = run_cli("batch", str(bad))
    assert proc.returncode == 2 and "bad.toml:" in proc.stderr and "fit" in proc.stderr


def test_check_rescores_a_fitted_export_with_its_profile_file(
    fitted: tuple[Path, dict[str, Any], int], tmp_path: Path
) -> None:
    out, _, budget = fitted
    copy = shutil.copytree(out, tmp_path / "copy")
    proc = run_cli("check", "--manifest", str(copy / "manifest.json"), "--eval-data", str(DEMO_EVAL))
    assert proc.returncode in (0, 1), proc.stderr + proc.stdout
    assert f"FIT-{budget}" in proc.stdout
    (copy / f"body-FIT-{budget}.profile.toml").write_text("")  # the file the manifest names, changed
    proc = run_cli("check", "--manifest", str(copy / "manifest.json"), "--eval-data", str(DEMO_EVAL))
    assert proc.returncode == 2 and "profile.toml is missing or differs" in proc.stderr
