#!/usr/bin/env python3
"""bench/imatrix: does an importance matrix from the adapter's own data lower quantization error?

On an export (default: `make demo`'s demo-out/), computes the importance matrix from --calibration
(default: the demo adapter's training chats), quantizes the export's F16 GGUF to each profile with
and without it, and scores every GGUF on held-out chats of the same domain (the demo's evaluation
set, not used for calibration) against the unmerged reference: mean KL divergence ± standard error,
top-1 agreement, and the paired change in KLD that the matrix brings (with its standard error).

    .venv/bin/python bench/imatrix.py [--export demo-out] [--profile Q4_K_M --profile IQ4_XS ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from converters.llama_runtime import score_gguf  # noqa: E402
from converters.quantize import quantize_gguf  # noqa: E402
from converters.vendor import locate_vendored  # noqa: E402
from exporter.adapter import read_adapter  # noqa: E402
from exporter.imatrix import compute_imatrix  # noqa: E402
from exporter.pipeline import input_hashes  # noqa: E402
from exporter.quality import QualityOptions, build_reference  # noqa: E402
from quant_profiles import builtin_profiles  # noqa: E402

DATA = ROOT / "exporter" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--calibration", type=Path, default=DATA / "demo_train.jsonl")
    parser.add_argument("--eval-data", type=Path, default=DATA / "demo_eval.jsonl")
    parser.add_argument("--profile", action="append", default=None)
    args = parser.parse_args()
    profiles = args.profile or ["Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"]
    manifest_file = args.export / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"{manifest_file} is missing: run `make demo` first")
    manifest = json.loads(manifest_file.read_text())
    adapters = [read_adapter(Path(a["path"]), a["weight"]) for a in manifest["inputs"]["adapters"]]
    base = Path(manifest["inputs"]["base"]["path"])
    merged = args.export / "merged"
    f16 = args.export / manifest["intermediates"][0]["path"]
    reference = build_reference(
        base, adapters, merged, input_hashes(manifest), QualityOptions(eval_data=args.eval_data)
    )
    sequences = reference.eval.sequences
    registry = builtin_profiles()
    threads = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as scratch_name:
        scratch = Path(scratch_name)
        start = time.perf_counter()
        imatrix = scratch / "imatrix.gguf"
        info = compute_imatrix(merged, f16, args.calibration, imatrix, locate_vendored(), threads=threads)
        print(
            f"importance matrix: {info.entries} tensors from {info.tokens} tokens of {args.calibration.name} "
            f"({time.perf_counter() - start:.1f} s); held out: {reference.eval.n_scored} positions of "
            f"{args.eval_data.name}"
        )

        def score(gguf: Path) -> dict[str, np.ndarray]:
            out = scratch / f"{gguf.stem}.npz"
            score_gguf(gguf, sequences, reference.file, out, threads=threads)
            return dict(np.load(out))

        baseline = None
        for name in profiles:
            profile = registry.get(name)
            scored = {}
            for with_matrix in (False, True):
                if profile.needs_imatrix and not with_matrix:
                    continue
                gguf = scratch / f"{name}-{'imatrix' if with_matrix else 'plain'}.gguf"
                quantize_gguf(f16, gguf, profile, threads, imatrix=imatrix if with_matrix else None)
                scored[with_matrix] = score(gguf)
                if name == "Q4_K_M" and not with_matrix:
                    baseline = scored[False]
                rows.append((name, with_matrix, gguf.stat().st_size, scored[with_matrix], scored.get(False)))
    print()
    print(
        f"{'profile':8} {'imatrix':8} {'MiB':>6} {'mean KLD':>10} {'± SE':>8} {'top-1':>7} "
        f"{'Δ KLD vs same w/o':>18} {'Δ KLD vs Q4_K_M w/o':>20}"
    )
    for name, with_matrix, size, result, without in rows:
        kld = result["kld"]
        se = kld.std(ddof=1) / np.sqrt(len(kld))

        def paired(other: dict[str, np.ndarray] | None, kld: np.ndarray = kld) -> str:
            if other is None or other["kld"] is kld:
                return "–"
            diff = kld - other["kld"]
            return f"{diff.mean():+.4f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}"

        print(
            f"{name:8} {'yes' if with_matrix else 'no':8} {size / 2**20:6.1f} {kld.mean():10.4f} {se:8.4f} "
            f"{result['same_top'].mean():6.1%} {paired(without):>18} {paired(baseline):>20}"
        )


if __name__ == "__main__":
    main()
