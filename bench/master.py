#!/usr/bin/env python3
"""bench/master: does a 32-bit master GGUF help the quantized files of a fine-tune whose merged weights do not
survive 16-bit rounding?

A KaSA adapter (PEFT 0.21: the base weight truncated by SVD, so every targeted matrix is rewritten) on the
demo base, exported twice side by side, with the same profiles and evaluation data:

  16-bit   the default: merged in float16, the F16 GGUF is the quantizer's source and exactness reference
  master   --dtype float32: merged in float32, the F32 GGUF is both

and a table of each artifact's mean KLD and top-1 against the unmerged model, with the 16-bit floor (the
merged model rounded to float16, scored in PyTorch). Work files under bench/.work/master.

    .venv/bin/python bench/master.py [--profile Q8_0 --profile Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "master"


def kasa_adapter(base: Path, out: Path) -> Path:
    """A KaSA adapter with random (non-zero) factors on every linear layer, saved by PEFT."""
    import torch
    from peft import KasaConfig, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", kasa_config=KasaConfig())
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                parameter.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    return out


def export(adapter: Path, base: Path, out: Path, profiles: list[str], extra: list[str]) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "exporter", "merge-quantize", "--adapter", str(adapter), "--base", str(base),
        "--name", "kasa", *(a for p in profiles for a in ("--profile", p)), "--out", str(out), "--no-cache",
        "--eval-data", str(ROOT / "exporter" / "data" / "demo_eval.jsonl"), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: a failed gate, which is what is measured
        raise SystemExit(f"export failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="append", dest="profiles")
    args = parser.parse_args()
    profiles = args.profiles or ["Q8_0", "Q4_K_M"]
    sys.path.insert(0, str(ROOT))
    from demos.inputs import build_demo

    base, _ = build_demo(ROOT / ".cache" / "demo")
    adapter = kasa_adapter(base, WORK / "kasa-adapter")
    runs = {
        "16-bit": export(adapter, base, WORK / "out-16", profiles, ["--gate", "F16:max_mean_kld=1e-9"]),
        "master": export(adapter, base, WORK / "out-32", profiles, ["--dtype", "float32"]),
    }
    print(f"KaSA r=8 on {base.name}, profiles {', '.join(profiles)}")
    print(f"{'export':8} {'artifact':8} {'size MiB':>9} {'mean KLD':>10} {'top-1':>7} {'16-bit floor':>13}")
    for name, (seconds, report) in runs.items():
        for row in report["artifacts"]:
            metrics = row["metrics"]
            floor = (metrics.get("rounding_floor") or {}).get("mean_kld")
            print(
                f"{name:8} {row['label']:8} {row['size_bytes'] / 2**20:9.1f} {metrics['mean_kld']:10.5f} "
                f"{metrics['top1']:7.1%} {'' if floor is None else f'{floor:.5f}':>13}"
            )
        print(f"{name:8} {'(time)':8} {seconds:8.0f}s")


if __name__ == "__main__":
    main()
