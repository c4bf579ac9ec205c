#!/usr/bin/env python3
"""bench/fit: does `--fit SIZE` beat the uniform profiles that fit the same budget, on text the search never saw?

For each model, one export with every uniform profile llama.cpp makes without an importance matrix and a fit
to the first budget (the search runs once: its trials are cache entries), then one export per further budget
(every trial reused). Budgets are spread between the model's Q3_K_M and Q5_K_M sizes. The table gives, per
budget, the fitted file's size and its mean KLD on the held-out evaluation windows, the best uniform profile
no larger than the budget on the same windows, and what the search cost (its trials' seconds). Models:

  demo   the demo: SmolLM2-135M with the pirate LoRA (576-wide rows: most k-quants fall back to 32-block types)
  body   the demo base cut to 512-wide rows and 8 layers with a LoRA trained on it (tests/fit_fixture.py):
         k-quants everywhere, and the embedding half of the weights

    .venv/bin/python bench/fit.py [--model demo --model body] [--budgets 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "fit"
EVAL = ROOT / "exporter" / "data" / "demo_eval.jsonl"
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages


def uniform_profiles() -> tuple[str, ...]:
    """Every built-in quantized profile llama.cpp makes without an importance matrix (Q2_K … Q8_0)."""
    from quant_profiles import builtin_profiles

    return tuple(
        p.name
        for p in builtin_profiles().profiles
        if p.ftype not in ("F16", "BF16", "F32") and not p.needs_imatrix and not p.overrides.tensor_types
    )


def inputs(model: str) -> tuple[Path, Path]:
    from demos.inputs import build_demo

    base, adapter = build_demo(ROOT / ".cache" / "demo")
    if model == "demo":
        return base, adapter
    from tests.fit_fixture import fit_body

    return fit_body(base.resolve())


def export(model: str, base: Path, adapter: Path, out: Path, profiles: tuple[str, ...], budget: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "exporter", "merge-quantize", "--adapter", str(adapter), "--base", str(base),
        "--name", model, *(a for p in profiles for a in ("--profile", p)), "--fit", str(budget),
        "--out", str(out), "--eval-data", str(EVAL),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 1):  # 1: some uniform profile failed its gates, which is the point
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def held_out(row: dict[str, Any]) -> float:
    return float(row["metrics"]["held_out_mean_kld"])


def bench(model: str, n_budgets: int) -> list[str]:
    base, adapter = inputs(model)
    sizes = _uniform_sizes(model, base, adapter)
    low, high = sizes["Q3_K_M"], sizes["Q5_K_M"]
    budgets = [low + (high - low) * i // (n_budgets - 1) for i in range(n_budgets)]
    first_budget = budgets[0]  # searched with every uniform profile beside it; the others reuse its trials
    names = uniform_profiles()
    report = export(model, base, adapter, WORK / model / "all", names, first_budget)
    uniform = [r for r in report["artifacts"] if r["label"] in names]
    rows = [
        f"\n{model}: {report['fit']['trials']} trials over {len(report['fit']['groups'])} tensor groups in "
        f"{report['fit']['bands']} band(s) of layers, costing {report['fit']['trial_seconds']:.0f} s once; "
        f"{report['fit']['reach']['smallest'] / 2**20:.1f} to {report['fit']['reach']['largest'] / 2**20:.1f} MiB reachable",
        "",
        "| budget | fitted size | fitted held-out KLD | best uniform that fits | its size | its held-out KLD "
        "| fit stage s (this run) |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for budget in budgets:
        data = (
            report
            if budget == first_budget
            else export(model, base, adapter, WORK / model / str(budget), (), budget)
        )
        fit = next(r for r in data["artifacts"] if r["label"] == data["fit"]["profile"])
        fitting = [r for r in uniform if r["size_bytes"] <= budget]
        best = min(fitting, key=held_out) if fitting else None
        rival = (
            f"{best['label']} | {best['size_bytes'] / 2**20:.1f} MiB | {held_out(best):.5f}"
            if best
            else "– | – | –"
        )
        rows.append(
            f"| {budget / 2**20:.1f} MiB | {fit['size_bytes'] / 2**20:.1f} MiB | {held_out(fit):.5f} | {rival} | "
            f"{data['fit']['seconds']:.0f} |"
        )
    return rows


def _uniform_sizes(model: str, base: Path, adapter: Path) -> dict[str, int]:
    out = WORK / model / "sizes"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "exporter", "merge-quantize", "--adapter", str(adapter), "--base", str(base),
        "--name", model, "--profile", "Q3_K_M", "--profile", "Q5_K_M", "--no-check", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return {p: (out / f"{model}-{p}.gguf").stat().st_size for p in ("Q3_K_M", "Q5_K_M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", action="append", choices=("demo", "body"))
    parser.add_argument("--budgets", type=int, default=5)
    args = parser.parse_args()
    lines = []
    for model in args.model or ["demo", "body"]:
        lines += bench(model, max(2, args.budgets))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
