#!/usr/bin/env python3
"""bench/quality: the quality check's GGUF evaluation speed against llama-cpp-python's raw eval.

On the same token ids (the demo's evaluation data), for each GGUF of an export:

  check   the scoring loop `edge-export check` runs in its llama.cpp child: eval with all logits,
          log-softmax, KLD against the cached reference, top-1 and nll per position
  raw     llama-cpp-python's `Llama.eval` of the same sequences, nothing else

each in its own child process (model loading excluded from both), best of --runs. Target: check
≥ 0.8× raw tokens/s. Uses `make demo`'s export in demo-out/ (run `make demo` first).

    .venv/bin/python bench/quality.py [--export demo-out] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.child import run_child  # noqa: E402
from converters.llama_runtime import score_gguf  # noqa: E402
from exporter.inputs.adapter import read_adapter  # noqa: E402
from exporter.inputs.options import QualityOptions  # noqa: E402
from exporter.inputs.records import ModelInputs  # noqa: E402
from exporter.stages.quality import reference_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--eval-data", type=Path, default=ROOT / "exporter" / "data" / "demo_eval.jsonl")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    manifest_file = args.export / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"{manifest_file} is missing: run `make demo` first")
    manifest = json.loads(manifest_file.read_text())
    adapters = [read_adapter(Path(a["path"]), a["weight"]) for a in manifest["inputs"]["adapters"]]
    base = Path(manifest["inputs"]["base"]["path"])
    options = QualityOptions(eval_data=args.eval_data)
    inputs = ModelInputs.hashed(base, tuple(adapters))
    reference = reference_for(inputs, args.export / "merged", options)
    sequences = reference.eval.sequences
    threads = os.cpu_count() or 1
    print(
        f"{len(sequences)} sequences, {sum(len(s) for s in sequences)} tokens, {threads} threads, "
        f"best of {args.runs}"
    )
    print(f"{'artifact':28} {'raw tok/s':>10} {'check tok/s':>12} {'check/raw':>10}")
    for record in [*manifest["intermediates"], *manifest["artifacts"]]:
        gguf = args.export / record["path"]
        raw, check = 0.0, 0.0
        for _ in range(args.runs):
            request = {
                "op": "raw_eval",
                "gguf": str(gguf),
                "sequences": [list(s) for s in sequences],
                "n_ctx": max(len(s) for s in sequences),
                "threads": threads,
            }
            result = run_child("converters.llama_runtime", request, f"raw eval of {gguf.name}")
            raw = max(raw, result["tokens"] / result["eval_seconds"])
            with tempfile.TemporaryDirectory() as scratch:
                scored = score_gguf(gguf, sequences, reference.file, Path(scratch) / "s.npz", threads=threads)
            check = max(check, scored["tokens"] / scored["eval_seconds"])
        print(f"{gguf.name:28} {raw:10.0f} {check:12.0f} {check / raw:9.2f}x")
    print("target: check/raw >= 0.80x")


if __name__ == "__main__":
    main()
