"""Wall time of one plan three ways: its exports one by one (merge-quantize, runtime-lora), the batch on the
local executor, and the batch on a Ray cluster of two node processes on this machine. Each way starts
from an empty stage cache, and the files of all three must have the same sha256.

    python bench/batch.py [--cpus-per-node 1] [--check]

The plan: the demo adapter and two variants of it (rsLoRA scaling, an alpha_pattern), each merged and
quantized to Q4_K_M and Q8_0, and the two variants as runtime LoRAs on one F16 + Q4_K_M base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = Path(os.environ.get("EDGE_EXPORT_DEMO_DIR", REPO / ".cache" / "demo"))  # as the tests read it
CLUSTER = REPO / "bench" / "local_ray_cluster.sh"
EVAL = REPO / "exporter" / "data" / "demo_eval.jsonl"
PROFILES = ("Q4_K_M", "Q8_0")
VARIANTS = {
    "pirate-rslora": {"use_rslora": True},
    "pirate-alpha": {"alpha_pattern": {"q_proj": 32, "down_proj": 4}},
}


def adapters(root: Path) -> dict[str, Path]:
    found = {"pirate": DEMO / "adapter"}
    for name, changes in VARIANTS.items():
        target = root / "adapters" / name
        shutil.copytree(DEMO / "adapter", target)
        config = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        found[name] = target
    return found


def write_plan(root: Path, found: dict[str, Path], check: bool) -> Path:
    entries = "".join(f'\n[[adapters]]\nname = "{n}"\npath = "{p}"\n' for n, p in found.items())
    plan = root / "plan.toml"
    plan.write_text(
        f'out = "batch"\nprofiles = {json.dumps(list(PROFILES))}\ncheck = {str(check).lower()}\n'
        f'eval_data = "{EVAL}"\n[bases.smollm2]\npath = "{DEMO / "base"}"\n{entries}\n'
        f'[[runtime_lora]]\nname = "smollm2"\nadapters = ["{found["pirate-rslora"]}", "{found["pirate-alpha"]}"]\n'
        'profiles = ["F16", "Q4_K_M"]\n'
    )
    return plan


def run(args: list[str], cache: Path, cluster_cpus: int | None = None) -> float:
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    command = [sys.executable, "-m", "exporter", *args]
    if cluster_cpus is not None:
        command = [str(CLUSTER), str(cluster_cpus), *command]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return seconds


def sequential(root: Path, found: dict[str, Path], check: bool) -> float:
    out, cache, seconds = root / "sequential", root / "cache-sequential", 0.0
    flags = ["--eval-data", str(EVAL)] if check else ["--no-check"]
    for name, path in found.items():
        profiles = [arg for p in PROFILES for arg in ("--profile", p)]
        args = ["merge-quantize", "--adapter", str(path), "--base", str(DEMO / "base"), "--name", name]
        seconds += run([*args, *profiles, "--out", str(out / name), *flags], cache)
    runtime = [arg for n in VARIANTS for arg in ("--adapter", str(found[n]))]
    args = ["runtime-lora", *runtime, "--base", str(DEMO / "base"), "--name", "smollm2"]
    seconds += run(
        [*args, "--profile", "F16", "--profile", "Q4_K_M", "--out", str(out / "smollm2"), *flags], cache
    )
    return seconds


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.gguf"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each Ray node process offers")
    parser.add_argument("--check", action="store_true", help="also check every export against its reference")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as temp:
        root = Path(temp)
        found = adapters(root)
        plan = write_plan(root, found, options.check)
        times = {"one by one (merge-quantize ×3, runtime-lora)": sequential(root, found, options.check)}
        batch = ["batch", str(plan)]
        times["batch, local executor"] = run([*batch, "--out", str(root / "local")], root / "cache-local")
        ray = [*batch, "--out", str(root / "ray"), "--executor", "ray", "--ray-address", "127.0.0.1:6380"]
        times[f"batch, Ray: 2 node processes × {options.cpus_per_node} CPU"] = run(
            ray, root / "cache-ray", options.cpus_per_node
        )
        ray_own = json.loads((root / "ray" / "batch-report.json").read_text())["seconds"]
        reference = hashes(root / "sequential")
        for way in ("local", "ray"):
            assert hashes(root / way) == reference, f"the {way} batch's files differ from the sequential ones"
        print(f"{len(reference)} GGUF files, identical sha256 all three ways; {os.cpu_count()} cores")
        print("| way | wall time |\n|---|---:|")
        for way, seconds in times.items():
            print(f"| {way} | {seconds:.1f} s |")
        print(
            f"(the Ray row includes starting and stopping the cluster; the batch itself took {ray_own:.1f} s)"
        )


if __name__ == "__main__":
    main()
