#!/usr/bin/env python3
"""bench/imatrix: does an importance matrix from the adapter's own data lower quantization error?

On an export that kept its merged weights (default: bench/.work/imatrix-export/, the demo export
`make bench-imatrix` writes with --keep-merged), computes the importance matrix from --calibration
(default: the demo adapter's training chats), quantizes the export's F16 GGUF to each profile with
and without it, and scores every GGUF on held-out chats of the same domain (the demo's evaluation
set, not used for calibration) against the unmerged reference: mean KL divergence ± standard error,
top-1 agreement, and the paired change in KLD that the matrix brings (with its standard error).

`--aligned` first widens the merged model so that every weight row is a multiple of 256 wide, as in
7B-class models: SmolLM2-135M's 576-wide rows make llama.cpp store most "Q4_K_M" tensors as Q5_0 and
"IQ4_XS" ones as IQ4_NL, which hides what the matrix does for the k- and i-quants. The widened model
computes the same function (zero-padded hidden size 576 -> 768, one zero attention head added to each
group of query heads sharing a key/value head, norm weights and epsilon rescaled for the longer mean),
which the F16 row of its table confirms against the same unmerged reference.

    .venv/bin/python bench/imatrix.py [--export bench/.work/imatrix-export] [--aligned] [--profile Q4_K_M --profile IQ4_XS ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from converters.hf_to_gguf import convert_hf_to_gguf  # noqa: E402
from converters.llama_runtime import score_gguf  # noqa: E402
from converters.quantize import quantize_gguf  # noqa: E402
from converters.vendor import locate_vendored  # noqa: E402
from exporter.inputs.adapter import read_adapter  # noqa: E402
from exporter.inputs.options import QualityOptions  # noqa: E402
from exporter.inputs.records import ModelInputs  # noqa: E402
from exporter.quality.imatrix import compute_imatrix  # noqa: E402
from exporter.stages.quality import reference_for  # noqa: E402
from quant_profiles import builtin_profiles  # noqa: E402

DATA = ROOT / "exporter" / "data"
K_QUANT_ROW = 256


def widen_to_k_quant_rows(source: Path, target: Path) -> dict[str, int]:
    """Write to `target` a Llama model computing what the one in `source` computes, with every
    weight row a multiple of 256 wide: hidden and intermediate sizes zero-padded, query heads padded
    with zero heads (one per key/value group, so the grouping of the real heads is kept)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "llama" or config.get("attention_bias") or config.get("mlp_bias"):
        raise SystemExit(f"--aligned widens bias-free Llama models only; {source} is not one")
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    wide = math.ceil(hidden / K_QUANT_ROW) * K_QUANT_ROW
    wide_inter = math.ceil(inter / K_QUANT_ROW) * K_QUANT_ROW
    wide_heads = wide // head_dim
    group, wide_group = heads // kv_heads, wide_heads // kv_heads
    if wide % head_dim or wide_heads % kv_heads or wide_group < group:
        raise SystemExit(f"cannot widen {source}: {wide} is not a whole number of heads per key/value group")
    # Real query head i keeps its key/value group: it moves to slot (i // group) * wide_group + i % group.
    slots = torch.tensor([(i // group) * wide_group + i % group for i in range(heads)])
    head_rows = (slots[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    # RMSNorm over `wide` values of which `hidden` are non-zero: the mean shrinks by hidden/wide;
    # scaling epsilon by the same factor and the weight by its square root gives back the same output.
    shrink = hidden / wide

    def pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        out = torch.zeros(rows, cols, dtype=t.dtype)
        out[: t.shape[0], : t.shape[1]] = t
        return out

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(shard))
    widened = {}
    for name, t in tensors.items():
        leaf = name.rsplit(".", 2)[-2]
        if name.endswith("norm.weight"):
            out = torch.zeros(wide, dtype=t.dtype)
            out[:hidden] = (t.float() * math.sqrt(shrink)).to(t.dtype)
        elif leaf in ("embed_tokens", "lm_head", "k_proj", "v_proj"):
            out = pad(t, t.shape[0], wide)
        elif leaf == "q_proj":
            out = torch.zeros(wide_heads * head_dim, wide, dtype=t.dtype)
            out[head_rows, :hidden] = t
        elif leaf == "o_proj":
            out = torch.zeros(wide, wide_heads * head_dim, dtype=t.dtype)
            out[:hidden, head_rows] = t
        elif leaf in ("gate_proj", "up_proj"):
            out = pad(t, wide_inter, wide)
        elif leaf == "down_proj":
            out = pad(t, wide, wide_inter)
        else:
            raise SystemExit(f"cannot widen {source}: unexpected tensor {name}")
        widened[name] = out.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith(".index.json"):
            shutil.copy(item, target / item.name)
    save_file(widened, str(target / "model.safetensors"), metadata={"format": "pt"})
    config.update(
        hidden_size=wide,
        intermediate_size=wide_inter,
        num_attention_heads=wide_heads,
        head_dim=head_dim,
        rms_norm_eps=config["rms_norm_eps"] * shrink,
    )
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return {"hidden": wide, "intermediate": wide_inter, "heads": wide_heads}


# (profile, with a matrix, size, scores, scores of the same profile without a matrix)
Row = tuple[str, bool, int, dict[str, np.ndarray], dict[str, np.ndarray] | None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, default=ROOT / "bench" / ".work" / "imatrix-export")
    parser.add_argument("--calibration", type=Path, default=DATA / "demo_train.jsonl")
    parser.add_argument("--eval-data", type=Path, default=DATA / "demo_eval.jsonl")
    parser.add_argument("--profile", action="append", default=None)
    parser.add_argument(
        "--aligned", action="store_true", help="widen the merged model to 256-multiple rows first"
    )
    args = parser.parse_args()
    profiles = args.profile or ["Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"]
    manifest_file = args.export / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"{manifest_file} is missing: run `make bench-imatrix`")
    manifest = json.loads(manifest_file.read_text())
    adapters = [read_adapter(Path(a["path"]), a["weight"]) for a in manifest["inputs"]["adapters"]]
    base = Path(manifest["inputs"]["base"]["path"])
    merged = args.export / "merged"
    if not list(merged.glob("*.safetensors")):
        raise SystemExit(
            f"{merged} holds no weights (released once the F16 GGUF was written): export again with "
            "--keep-merged (`make bench-imatrix` does)"
        )
    f16 = args.export / manifest["intermediates"][0]["path"]
    reference = reference_for(
        ModelInputs.hashed(base, tuple(adapters)), merged, QualityOptions(eval_data=args.eval_data)
    )
    sequences = reference.eval.sequences
    registry = builtin_profiles()
    threads = os.cpu_count() or 1
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as scratch_name:
        scratch = Path(scratch_name)
        if args.aligned:
            start = time.perf_counter()
            shape = widen_to_k_quant_rows(merged, scratch / "aligned")
            merged, f16 = scratch / "aligned", scratch / "aligned-F16.gguf"
            convert_hf_to_gguf(merged, f16, locate_vendored(), model_name="aligned")
            print(f"widened to {shape} and converted ({time.perf_counter() - start:.1f} s)")
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
        if args.aligned:
            rows.append(("F16", False, f16.stat().st_size, score(f16), None))
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
    print_table(rows, baseline)


def print_table(rows: list[Row], baseline: dict[str, np.ndarray] | None) -> None:
    """One line per GGUF: size, mean KLD with its standard error, top-1, and paired KLD differences
    against the same profile without a matrix and against Q4_K_M without one."""
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
