#!/usr/bin/env python3
"""bench/pipeline: `edge-export merge-quantize` against the manual llama.cpp recipe, side by side.

On the same inputs, each in its own process, with an empty stage cache where it says "cold". The
inputs: `--model demo` the demo's SmolLM2-135M base and pirate adapter (`make demo-inputs`);
`--model 1b` (default) a synthetic fp16 Llama of 1.2B parameters (TinyLlama-1.1B's shapes with
SmolLM2's tokenizer and chat template, random weights, built once into bench/.work/) and an r=16
LoRA on every linear layer, the size where fixed costs stop hiding what a stage costs; or
`--base DIR --adapter DIR`.

  recipe        PEFT merge_and_unload + save_pretrained, copy the tokenizer files, the vendored
                convert_hf_to_gguf.py --outtype f16, then llama_model_quantize for each profile
  cold          edge-export merge-quantize --profile Q4_K_M --profile Q8_0 --no-check (empty cache)
  unchanged     the same command again (warm cache)
  add Q5_K_M    the same command with --profile Q5_K_M added
  Q5_K_M alone  quantizing the F16 GGUF to Q5_K_M, nothing else (what adding it must cost)

and prints the wall times and the three ratios against their targets: cold <= 1.0x the recipe,
unchanged <= 5% of cold, add Q5_K_M <= 1.2x Q5_K_M alone. The quality check is off in both
contenders because the recipe has none.

    .venv/bin/python bench/pipeline.py [--model 1b|demo] [--base DIR --adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from converters.vendor import VendoredLlamaCpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / ".cache" / "demo"
WORK_1B = ROOT / "bench" / ".work" / "pipeline-1b"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)

RECIPE = """
import shutil, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
for name in sys.argv[4:]:
    if (Path(base) / name).is_file():
        shutil.copy(Path(base) / name, Path(out) / name)
"""

QUANTIZE = """
import sys
from pathlib import Path
from converters.quantize import quantize_gguf
from quant_profiles import builtin_profiles
source, target = sys.argv[1:3]
quantize_gguf(Path(source), Path(target), builtin_profiles().get(sys.argv[3]))
"""


def timed(command: list[str], env: dict[str, str] | None = None, settle: bool = True) -> float:
    """Wall seconds of `command`; with `settle`, what earlier commands wrote is flushed to disk first,
    so a contender does not pay for its predecessor's write-back."""
    if settle:
        os.sync()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} … failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def build_1b() -> tuple[Path, Path]:
    """The 1.2B synthetic base and adapter (bench/merge.py's builder, with SmolLM2's tokenizer)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from merge import CONFIG, build_inputs

    demo_config = json.loads((DEMO / "base" / "config.json").read_text())
    ids = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    config = {**CONFIG, **{k: demo_config[k] for k in ids}}
    return build_inputs(WORK_1B, config, DEMO / "base")


@dataclass(frozen=True)
class Timings:
    """Wall seconds of every contender; the recipe's steps and the cold run's stages are the best run's."""

    steps: dict[str, float]
    cold: float
    stages: dict[str, float]
    unchanged: float
    added: float
    q5_alone: float

    @property
    def recipe(self) -> float:
        return sum(self.steps.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("1b", "demo"), default="1b")
    parser.add_argument("--base", type=Path, help="a base model folder (instead of --model)")
    parser.add_argument("--adapter", type=Path, help="an adapter folder for --base")
    parser.add_argument(
        "--runs", type=int, default=1, help="recipe/cold pairs, interleaved; the best of each"
    )
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_1b()
        return
    if (args.base is None) != (args.adapter is None):
        parser.error("--base and --adapter go together")
    if args.base is None and args.model == "demo":
        args.base, args.adapter = DEMO / "base", DEMO / "adapter"
    elif args.base is None:
        # Built in a child: torch stays out of this process, whose children inherit its size.
        subprocess.run([sys.executable, __file__, "--build"], check=True)
        args.base, args.adapter = WORK_1B / "base", WORK_1B / "adapter"
    print_results(args.base, args.runs, measure(args.base, args.adapter, args.runs))


def measure(base: Path, adapter: Path, runs: int) -> Timings:
    """The recipe and the cold export `runs` times, interleaved, then the warm re-runs and Q5_K_M alone."""
    from converters.vendor import locate_vendored

    vendored = locate_vendored()
    work = ROOT / "bench" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-", dir=work) as scratch_name:
        scratch = Path(scratch_name)
        f16 = scratch / "recipe-F16.gguf"
        recipes: list[dict[str, float]] = []
        colds: list[tuple[float, dict[str, float]]] = []
        for run in range(runs):  # interleaved, so both see the same drift in the machine's state
            recipes.append(run_recipe(base, adapter, scratch, vendored))
            cache = scratch / f"cache-{run}"
            if run:
                shutil.rmtree(scratch / f"cache-{run - 1}")
            wall = run_export(base, adapter, scratch, cache, "Q4_K_M", "Q8_0")
            manifest = json.loads((scratch / "edge" / "manifest.json").read_text())
            colds.append((wall, manifest["stage_seconds"]))
        steps = min(recipes, key=lambda s: sum(s.values()))
        cold, stages = min(colds, key=lambda c: c[0])
        q5_alone = timed(
            [sys.executable, "-c", QUANTIZE, str(f16), str(scratch / "alone-Q5_K_M.gguf"), "Q5_K_M"]
        )
        # `cache` is now the warm cache of the last cold run.
        unchanged = run_export(base, adapter, scratch, cache, "Q4_K_M", "Q8_0")
        added = run_export(base, adapter, scratch, cache, "Q4_K_M", "Q8_0", "Q5_K_M")
    return Timings(steps, cold, stages, unchanged, added, q5_alone)


def run_recipe(base: Path, adapter: Path, scratch: Path, vendored: VendoredLlamaCpp) -> dict[str, float]:
    """The manual recipe, step by step, from nothing."""
    python = sys.executable
    merged, f16 = scratch / "recipe-merged", scratch / "recipe-F16.gguf"
    converter_env = dict(os.environ, PYTHONPATH=str(vendored.gguf_py), HF_HUB_OFFLINE="1")
    shutil.rmtree(merged, ignore_errors=True)
    steps = {
        "PEFT merge + save": timed(
            [python, "-c", RECIPE, str(base), str(adapter), str(merged), *TOKENIZER_FILES]
        ),
        "convert_hf_to_gguf": timed(
            [
                python,
                str(vendored.convert_hf_script),
                str(merged),
                "--outtype",
                "f16",
                "--outfile",
                str(f16),
            ],
            converter_env,
            settle=False,  # the recipe's steps run back to back, as a script would run them
        ),
    }
    for profile in ("Q4_K_M", "Q8_0"):
        target = scratch / f"recipe-{profile}.gguf"
        command = [python, "-c", QUANTIZE, str(f16), str(target), profile]
        steps[f"quantize {profile}"] = timed(command, settle=False)
    return steps


def run_export(base: Path, adapter: Path, scratch: Path, cache: Path, *profiles: str) -> float:
    """Wall seconds of `edge-export merge-quantize` into scratch/edge with the stage cache at `cache`."""
    profile_args = [a for p in profiles for a in ("--profile", p)]
    command = [sys.executable, "-m", "exporter", "merge-quantize", "--adapter", str(adapter)]
    command += ["--base", str(base), "--name", "bench", *profile_args, "--no-check", "--force"]
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache))
    return timed([*command, "--out", str(scratch / "edge")], env)


def print_results(base: Path, runs: int, timings: Timings) -> None:
    """The wall times side by side, then the three ratios against their targets."""
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(
        f"base: {base.relative_to(ROOT) if base.is_relative_to(ROOT) else base} "
        f"({size / 2**30:.2f} GiB of safetensors); {os.cpu_count()} cores"
    )
    print(f"{'':34} {'wall s':>8}" + (f"   (best of {runs})" if runs > 1 else ""))
    for step, seconds in timings.steps.items():
        print(f"  recipe: {step:26} {seconds:8.1f}")
    print(f"{'recipe, total':34} {timings.recipe:8.1f}")
    print(f"{'edge-export cold (empty cache)':34} {timings.cold:8.1f}")
    for stage, seconds in timings.stages.items():
        print(f"  edge-export: {stage:21} {seconds:8.1f}")
    print(f"{'edge-export unchanged re-run':34} {timings.unchanged:8.1f}")
    print(f"{'edge-export adding Q5_K_M':34} {timings.added:8.1f}")
    print(f"{'quantizing Q5_K_M alone':34} {timings.q5_alone:8.1f}")
    print()
    checks = [
        ("cold / recipe", timings.cold / timings.recipe, 1.0),
        ("unchanged / cold", timings.unchanged / timings.cold, 0.05),
        ("adding Q5_K_M / Q5_K_M alone", timings.added / timings.q5_alone, 1.2),
    ]
    for name, ratio, limit in checks:
        verdict = "meets" if ratio <= limit else "misses"
        print(f"{name:34} {ratio:8.2f}x  (target <= {limit:.2f}x: {verdict})")


if __name__ == "__main__":
    main()
