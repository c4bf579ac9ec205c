#!/usr/bin/env python3
"""bench/qlora: what a QLoRA adapter's merge base does to quality, and what measuring both costs.

On `--model demo` (default) the demo's QLoRA adapter (demos/qlora.py: SmolLM2-135M rounded to
NF4 with double quant by bitsandbytes, r=16 LoRA on every linear layer, trained on CPU); on `--model 1b`
bench/pipeline.py's synthetic 1.2B fp16 Llama (random weights) and its r=16 LoRA, declared trained on
NF4 + double quant (--trained-on nf4 --double-quant): random weights make its KLDs a measure of the
4-bit rounding alone, not of a fine-tune, but its times are those of a real 1.2B model. Each run in
its own process with an empty stage cache:

  w16 only   edge-export merge-quantize --merge-base w16   (one candidate; both references)
  auto       edge-export merge-quantize --merge-base auto  (both candidates; the lower loss is kept)

and prints, for both candidates and every profile, the mean KLD against the model as trained (4-bit
base + adapter) and against the 16-bit reference (16-bit base + adapter), and the evaluation loss;
then the wall times, the extra time of auto, and the second candidate's time per stage.

    .venv/bin/python bench/qlora.py [--model demo|1b] [--profile Q4_K_M --profile Q8_0] [--eval-data FILE]
                                    [--eval-chats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demos.inputs import build_demo  # noqa: E402
from demos.qlora import ADAPTER, build_qlora_demo  # noqa: E402
from exporter.qlora.report import CANDIDATE_TITLES  # noqa: E402

PIPELINE_1B = ROOT / "bench" / ".work" / "pipeline-1b"  # bench/pipeline.py's 1.2B inputs


def export(
    adapter: Path, base: Path, out: Path, mode: str, profiles: list[str], eval_data: Path, extra: list[str]
) -> float:
    """One cold merge-quantize in its own process and cache; its wall time (its console output is kept
    in <out>.log)."""
    args = [
        sys.executable,
        "-m",
        "exporter",
        "merge-quantize",
        "--adapter",
        str(adapter),
        "--base",
        str(base),
    ]
    args += [arg for p in profiles for arg in ("--profile", p)]
    args += [
        "--name",
        "smollm2-pirate-qlora",
        "--out",
        str(out),
        "--eval-data",
        str(eval_data),
        "--merge-base",
        mode,
        *extra,
    ]
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(out.parent / f"cache-{mode}"), COLUMNS="200")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1):  # 1: a quality gate failed, the export itself is complete
        raise SystemExit(f"merge-quantize --merge-base {mode} failed:\n{proc.stderr}\n{proc.stdout}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("demo", "1b"), default="demo")
    parser.add_argument("--profile", action="append", default=None)
    parser.add_argument("--eval-data", type=Path, default=ROOT / "exporter" / "data" / "demo_eval.jsonl")
    parser.add_argument("--eval-chats", type=int, help="only the first N chats of --eval-data")
    parser.add_argument("--keep", type=Path, help="copy both runs' console output here")
    args = parser.parse_args()
    demo = ROOT / ".cache" / "demo"
    base, _ = build_demo(demo)
    if args.model == "demo":
        profiles = args.profile or ["Q4_K_M", "Q8_0"]
        adapter = build_qlora_demo(base, demo / "qlora") / ADAPTER
        extra: list[str] = []
        title = "demo QLoRA adapter (SmolLM2-135M, r=16 on all linear layers, trained on CPU)"
    else:
        profiles = args.profile or ["Q4_K_M"]
        # Built in a child: torch stays out of this process, whose children inherit its size.
        subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline.py"), "--build"], check=True)
        base, adapter = PIPELINE_1B / "base", PIPELINE_1B / "adapter"
        extra = ["--trained-on", "nf4", "--double-quant"]
        title = "synthetic 1.2B Llama (random weights), r=16 LoRA on all linear layers, declared NF4"
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as scratch:
        eval_data = args.eval_data
        if args.eval_chats:
            eval_data = Path(scratch) / "eval.jsonl"
            chats = args.eval_data.read_text().splitlines(keepends=True)[: args.eval_chats]
            eval_data.write_text("".join(chats))
        walls = {
            m: export(adapter, base, Path(scratch) / m, m, profiles, eval_data, extra)
            for m in ("w16", "auto")
        }
        section = json.loads((Path(scratch) / "auto" / "manifest.json").read_text())["merge_base"]
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for mode in walls:
                (args.keep / f"{args.model}-{mode}.log").write_text(
                    (Path(scratch) / f"{mode}.log").read_text()
                )
    trained = section["trained_on"]
    print(f"{title}; {trained['quant_type'].upper()}{' + double quant' if trained['double_quant'] else ''}; "
          f"{section['tokens']} evaluation tokens; {os.cpu_count()} cores")  # fmt: skip
    print(
        f"{'candidate':24} {'profile':8} {'KLD vs as trained':>18} {'KLD vs 16-bit':>14} {'eval loss':>10}  kept"
    )
    for row in section["candidates"]:
        print(
            f"{CANDIDATE_TITLES[row['candidate']]:24} {row['profile']:8} {row['kld_as_trained']:18.5f} "
            f"{row['kld_16bit']:14.5f} {row['eval_loss']:10.4f}  {'yes' if row['kept'] else ''}"
        )
    print(f"choice: {CANDIDATE_TITLES[section['chosen']]}: {section['reason']}")
    second = section["second_candidate_seconds"]
    stages = ", ".join(f"{name} {s:.1f}s" for name, s in second.items() if name != "total")
    print(f"wall: w16 only {walls['w16']:.1f}s, auto {walls['auto']:.1f}s "
          f"(+{walls['auto'] - walls['w16']:.1f}s, {walls['auto'] / walls['w16']:.2f}x)")  # fmt: skip
    print(f"second candidate per stage: {stages}")


if __name__ == "__main__":
    main()
