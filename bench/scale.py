#!/usr/bin/env python3
"""bench/scale: what an export and its check cost as the model grows, side by side at each size.

Synthetic fp16 Llama bodies with random weights (built once each into bench/.work/scale-<size>/, with
SmolLM2's tokenizer and chat template; a vocabulary larger than the tokenizer is padded by the converter
as for any such model) and an r=16 LoRA on every linear layer:

  0.36b  SmolLM2-360M's shapes          (tied embeddings, 49,152 rows)
  1.2b   TinyLlama-1.1B's shapes        (49,152 rows)
  3.2b   Llama-3.2-3B's shapes          (tied embeddings, 128,256 rows)
  8b     Llama-3.1-8B's shapes          (128,256 rows)

Contenders, each from nothing (an empty stage cache), one after the other, Q4_K_M:

  recipe      PEFT merge_and_unload + save_pretrained, the vendored convert_hf_to_gguf.py --outtype f16,
              then llama.cpp's quantize (the manual way, no check)
  unchecked   edge-export merge-quantize --no-check
  checked     edge-export merge-quantize (the check against the unmerged model on, the default; above
              1.5B weights it scores fewer tokens of the evaluation set: --eval-tokens auto)
  checked-all the same with --eval-tokens all (every token), where that differs from `checked`

For each: wall time, peak RSS (the largest process of the run, children included, from wait4), peak
disk (the most the file system's used space grew by while it ran: outputs, cache and temporary files),
and edge-export's per-stage seconds from its manifest. Results are kept in bench/.work/scale.json, so
sizes can be run one at a time; the table printed is every size measured so far.

    .venv/bin/python bench/scale.py [--sizes 0.36b,1.2b] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
DEMO = ROOT / ".cache" / "demo"
WORK = ROOT / "bench" / ".work"
RESULTS = WORK / "scale.json"
PROFILE = "Q4_K_M"

_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "float16",
    "hidden_act": "silu",
}
SIZES: dict[str, dict[str, Any]] = {
    "0.36b": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "1.2b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 49152,
        "tie_word_embeddings": False,
    },
    "3.2b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}

RECIPE_MERGE = """
import shutil, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json"):
    if (Path(base) / name).is_file():
        shutil.copy(Path(base) / name, Path(out) / name)
"""

QUANTIZE = """
import sys
from pathlib import Path
from converters.quantize import quantize_gguf
from quant_profiles import builtin_profiles
quantize_gguf(Path(sys.argv[1]), Path(sys.argv[2]), builtin_profiles().get(sys.argv[3]))
"""


@dataclass
class Cost:
    """One contender at one size."""

    wall: float = 0.0
    rss_mib: float = 0.0
    disk_gib: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


class DiskPeak:
    """The most the file system's used space grew by since start, sampled every half second."""

    def __init__(self) -> None:
        self.start = self._used()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        stat = os.statvfs(WORK)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self._used() - self.start)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used() - self.start)
        return self.peak / 2**30


def run(command: list[str], cost: Cost, env: dict[str, str] | None = None, gated: bool = False) -> None:
    """Run one step of a contender, adding its wall time to `cost` and raising its peak RSS. `gated`: exit
    code 1 (a failed quality gate: random weights make every distribution nearly flat) is a finished run."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    cost.wall += time.perf_counter() - start
    cost.rss_mib = max(cost.rss_mib, usage.ru_maxrss / 1024)
    if status != 0 and not (gated and os.waitstatus_to_exitcode(status) == 1):
        raise SystemExit(f"{' '.join(command[:5])} … failed:\n{output.decode(errors='replace')[-4000:]}")


def build(size: str) -> tuple[Path, Path]:
    """The synthetic base and adapter of `size` (bench/merge.py's builder), built once."""
    from merge import build_inputs

    demo = json.loads((DEMO / "base" / "config.json").read_text())
    ids = {k: demo[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = {**_LLAMA, **SIZES[size], **ids}
    return build_inputs(WORK / f"scale-{size}", config, DEMO / "base")


def recipe(base: Path, adapter: Path, scratch: Path) -> Cost:
    from converters.vendor import locate_vendored

    vendored = locate_vendored()
    cost, disk = Cost(), DiskPeak()
    merged, f16 = scratch / "recipe-merged", scratch / "recipe-F16.gguf"
    steps = {
        "merge": [sys.executable, "-c", RECIPE_MERGE, str(base), str(adapter), str(merged)],
        "convert": [sys.executable, str(vendored.convert_hf_script), str(merged), "--outtype", "f16"]
        + ["--outfile", str(f16)],
        f"quantize:{PROFILE}": [
            sys.executable,
            "-c",
            QUANTIZE,
            str(f16),
            str(scratch / f"recipe-{PROFILE}.gguf"),
            PROFILE,
        ],
    }
    env = dict(os.environ, PYTHONPATH=f"{vendored.gguf_py}:{ROOT}", HF_HUB_OFFLINE="1")
    for step, command in steps.items():
        before = cost.wall
        run(command, cost, env)
        cost.stages[step] = round(cost.wall - before, 1)
    cost.disk_gib = disk.stop()
    shutil.rmtree(scratch)
    return cost


CONTENDERS = {
    "recipe": [],
    "unchecked": ["--no-check"],
    "checked": [],
    "checked-all": ["--eval-tokens", "all"],
}


def export(base: Path, adapter: Path, scratch: Path, options: list[str]) -> Cost:
    cost, disk = Cost(), DiskPeak()
    out = scratch / "out"
    check = "--no-check" not in options
    command = [sys.executable, "-m", "exporter", "merge-quantize", "--adapter", str(adapter)]
    command += ["--base", str(base), "--name", "bench", "--profile", PROFILE, "--out", str(out), *options]
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(scratch / "cache"))
    run(command, cost, env, gated=check)
    cost.disk_gib = disk.stop()
    manifest = json.loads((out / "manifest.json").read_text())
    cost.stages = {k: round(v, 1) for k, v in manifest["stage_seconds"].items()}
    shutil.rmtree(scratch)
    return cost


def measure(size: str, contenders: list[str]) -> dict[str, Cost]:
    from exporter.inputs.evaldata import AUTO_FULL_WEIGHTS
    from exporter.inputs.safetensors_header import stored_weights

    subprocess.run([sys.executable, __file__, "--build", size], check=True)  # torch stays out of here
    base, adapter = WORK / f"scale-{size}" / "base", WORK / f"scale-{size}" / "adapter"
    scratch = WORK / f"scale-{size}" / "run"
    shutil.rmtree(scratch, ignore_errors=True)
    costs = {}
    for name in contenders:
        if name == "checked-all" and stored_weights(base) <= AUTO_FULL_WEIGHTS:
            continue  # the same run as `checked`
        os.sync()
        scratch.mkdir(parents=True)
        print(f"{size}: {name} …", flush=True)
        costs[name] = (
            recipe(base, adapter, scratch)
            if name == "recipe"
            else export(base, adapter, scratch, CONTENDERS[name])
        )
        print(f"{size}: {name} {costs[name].wall:.0f} s, {costs[name].rss_mib:.0f} MiB", flush=True)
    return costs


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    print(f"{PROFILE}; {os.cpu_count()} cores; r=16 all-linear adapter; random weights")
    print(
        "| size | params | run | wall s | × unchecked | peak RSS GiB | peak disk GiB | stages (s) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for size, result in results.items():
        params, costs = result["params"], result["runs"]
        unchecked = costs["unchecked"]["wall"] if "unchecked" in costs else float("nan")
        for name in (n for n in CONTENDERS if n in costs):
            cost = costs[name]
            stages = ", ".join(f"{k} {v:.0f}" for k, v in cost["stages"].items() if v >= 1)
            print(
                f"| {size} | {params / 1e9:.2f}B | {name} | {cost['wall']:.0f} | "
                f"{cost['wall'] / unchecked:.2f} | {cost['rss_mib'] / 1024:.1f} | {cost['disk_gib']:.1f} | "
                f"{stages} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="0.36b,1.2b,3.2b,8b", help="comma-separated, of " + ", ".join(SIZES)
    )
    parser.add_argument(
        "--table", action="store_true", help="print the table of what was measured, run nothing"
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated, of " + ", ".join(CONTENDERS) + " (measured ones are kept for the others)",
    )
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build)
        return
    from exporter.inputs.safetensors_header import stored_weights

    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.table:
        for size in args.sizes.split(","):
            if size not in SIZES:
                parser.error(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
            runs = {name: asdict(c) for name, c in measure(size, args.contenders.split(",")).items()}
            kept = results.get(size, {}).get("runs", {})
            params = stored_weights(WORK / f"scale-{size}" / "base")
            results[size] = {"params": params, "runs": {**kept, **runs}}
            RESULTS.write_text(json.dumps(results, indent=1))
    order = [s for s in SIZES if s in results]
    print_table({s: results[s] for s in order})


if __name__ == "__main__":
    main()
