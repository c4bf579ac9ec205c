"""`edge-export batch`: a plan of 3 adapters × 2 profiles and a runtime-LoRA group on the demo model, run by
the local executor within a memory budget and on a two-node Ray cluster on loopback, against the same
exports run one by one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exporter.core.errors import InputError
from exporter.graphs.batch import job_options
from exporter.inputs.batch_plan import load_plan
from exporter.inputs.options import RunOptions
from tests.conftest import DEMO_EVAL, REPO, DemoInputs, _variant, run_cli

CLUSTER = REPO / "bench" / "local_ray_cluster.sh"
PROFILES = ("Q4_K_M", "Q8_0")
RUNTIME_PROFILES = ("F16", "Q4_K_M")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Sequential:
    """The plan's exports run one by one with merge-quantize and runtime-lora: file -> sha256."""

    adapters: dict[str, Path]  # export name -> adapter folder
    hashes: dict[str, str]  # "<export>/<file>" -> sha256


@pytest.fixture(scope="session")
def sequential(demo_inputs: DemoInputs, tmp_path_factory: pytest.TempPathFactory) -> Sequential:
    """merge-quantize for each adapter and runtime-lora for the group, --no-check (in the whole suite these
    stages come from the cache that the demo and runtime-lora exports filled: the same inputs and names)."""
    root = tmp_path_factory.mktemp("sequential")
    adapters = {
        "smollm2-pirate": demo_inputs.adapter,
        "pirate-rslora": _variant(demo_inputs.adapter, root / "adapters" / "pirate-rslora", use_rslora=True),
        "pirate-alpha": _variant(
            demo_inputs.adapter,
            root / "adapters" / "pirate-alpha",
            alpha_pattern={"q_proj": 32, "down_proj": 4},
        ),
    }
    base = str(demo_inputs.base)
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    hashes = {}
    for name, adapter in adapters.items():
        out = root / name
        args = ["--adapter", str(adapter), "--base", base, "--name", name, "--no-check", "--out", str(out)]
        proc = run_cli("merge-quantize", *args, *profiles)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        hashes.update({f"{name}/{name}-{p}.gguf": sha256(out / f"{name}-{p}.gguf") for p in PROFILES})
    group = [arg for name in ("pirate-rslora", "pirate-alpha") for arg in ("--adapter", str(adapters[name]))]
    runtime = [arg for p in RUNTIME_PROFILES for arg in ("--profile", p)]
    out = root / "smollm2"
    proc = run_cli(
        "runtime-lora", *group, "--base", base, "--name", "smollm2", "--no-check", "--out", str(out), *runtime
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    files = [f"smollm2-{p}.gguf" for p in RUNTIME_PROFILES] + [
        "pirate-rslora.lora.gguf",
        "pirate-alpha.lora.gguf",
    ]
    hashes.update({f"smollm2/{f}": sha256(out / f) for f in files})
    return Sequential(adapters, hashes)


def write_plan(folder: Path, demo_inputs: DemoInputs, sequential: Sequential, check_pirate: bool) -> Path:
    """3 merged adapters × 2 profiles (the demo adapter checked when asked) and a runtime-LoRA group."""
    rslora, alpha = sequential.adapters["pirate-rslora"], sequential.adapters["pirate-alpha"]
    plan = folder / "plan.toml"
    plan.write_text(
        f"""out = "out"
profiles = {json.dumps(list(PROFILES))}
check = false

[bases.smollm2]
path = "{demo_inputs.base}"

[[adapters]]
path = "{demo_inputs.adapter}"
name = "smollm2-pirate"
check = {str(check_pirate).lower()}
eval_data = "{DEMO_EVAL}"

[[adapters]]
path = "{rslora.parent}/pirate-*"

[[runtime_lora]]
name = "smollm2"
adapters = ["{rslora}", "{alpha}"]
profiles = {json.dumps(list(RUNTIME_PROFILES))}
"""
    )
    return plan


def batch_hashes(out: Path, expected: dict[str, str]) -> dict[str, str]:
    return {name: sha256(out / name) for name in expected}


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_batch_matches_sequential_exports_within_its_memory_budget(
    demo_inputs: DemoInputs, sequential: Sequential, tmp_path: Path
):
    plan = write_plan(tmp_path, demo_inputs, sequential, check_pirate=True)
    proc = run_cli("batch", str(plan), "--cores", "2", "--max-memory", "1.2GB")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = tmp_path / "out"
    assert batch_hashes(out, sequential.hashes) == sequential.hashes

    events = read_events(out / "batch-schedule.jsonl")
    budget = int(1.2 * 2**30)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == len({e["stage"] for e in events})  # every stage started once
    assert all(e["memory_budget"] == budget and e["memory_in_use"] <= budget for e in events)
    assert all(e["cpus_in_use"] <= 2 for e in events)
    # A stage held back waited for memory (two conversions, ~0.7 GiB each, never run together here).
    held = [e for e in events if e["event"] == "held"]
    assert all(e["memory_in_use"] + e["memory"] > budget for e in held)
    running: dict[str, int] = {}
    for e in events:  # the log's own accounting, replayed
        if e["event"] == "start":
            running[e["stage"]] = e["memory"]
        elif e["event"] == "end":
            running.pop(e["stage"])
        assert sum(running.values()) == e["memory_in_use"] <= budget

    report = json.loads((out / "batch-report.json").read_text())
    rows = {(r["export"], r["adapter"], r["profile"]): r for r in report["rows"]}
    assert len(rows) == 3 * 2 + 2 * 2 and report["passed"]
    pirate = rows[("smollm2-pirate", "smollm2-pirate", "Q4_K_M")]
    assert 0 < pirate["mean_kld"] < 0.5 and pirate["gates_passed"] is True
    assert rows[("pirate-alpha", "pirate-alpha", "Q8_0")]["mean_kld"] is None  # not checked
    for name in ("smollm2-pirate", "pirate-rslora", "pirate-alpha", "smollm2"):
        assert (out / name / "manifest.json").is_file()
    junit = (out / "batch-junit.xml").read_text()
    assert junit.count("<testcase") == 10 and 'failures="0"' in junit
    assert (out / "batch.png").stat().st_size > 0
    assert "| smollm2-pirate | smollm2-pirate | Q4_K_M | ok |" in (out / "batch-report.md").read_text()


def test_plan_errors_name_the_file_and_line(demo_inputs: DemoInputs, tmp_path: Path):
    def refused(text: str) -> str:
        plan = tmp_path / "plan.toml"
        plan.write_text(f'out = "out"\n[bases.b]\npath = "{demo_inputs.base}"\n' + text)
        with pytest.raises(InputError) as caught:
            load_plan(plan)
        return str(caught.value)

    adapter = f'[[adapters]]\npath = "{demo_inputs.adapter}"\n'
    assert refused(adapter + adapter + "profile = ['Q8_0']\n").startswith(
        f"{tmp_path / 'plan.toml'}:8: adapters.1.profile: "
    )
    assert ":5: adapters.0.path: " in refused('[[adapters]]\npath = "nowhere/*"\n')
    assert ":6: adapters.0.base: no base named 'x'" in refused(adapter + 'base = "x"\n')
    assert ":6: adapters.0.gates: " in refused(adapter + "gates = ['max_kld=1']\n")
    assert ":6: adapters.0.eval_tokens: eval_tokens 'lots' is not a setting" in refused(
        adapter + "eval_tokens = 'lots'\n"
    )
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(
        f'out = "out"\neval_tokens = 600\n[bases.b]\npath = "{demo_inputs.base}"\n'
        + adapter
        + adapter.replace("[[adapters]]", "[[adapters]]\nname = 'all'\neval_tokens = 'all'")
    )
    plan = load_plan(plan_file)
    assert [job_options(plan, job, RunOptions(), False).quality.eval_tokens for job in plan.jobs] == [
        "600",
        "all",
    ]
    assert "two exports are named 'adapter'" in refused(adapter + adapter)
    assert ":6: runtime_lora.0.adapters: " in refused("[[runtime_lora]]\nname = 'g'\nadapters = 3\n")

    plan = tmp_path / "plan.toml"
    plan.write_text(f'out = "out"\n[bases.b]\npath = "{demo_inputs.base}"\n[[adapters]]\npath = 1\n')
    proc = run_cli("batch", str(plan))
    assert proc.returncode == 2 and f"{plan}:5: adapters.0.path" in proc.stderr
    assert not (tmp_path / "out").exists()


# A bound for a hung cluster, not a speed requirement: generous enough for a machine shared with other work.
CLUSTER_LIMIT_S = 3600


def run_on_local_ray_cluster(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a bash script beside a two-node Ray cluster on loopback; a hang fails with "timed out"."""
    try:
        return subprocess.run(
            [str(CLUSTER), "1", "bash", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=CLUSTER_LIMIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the Ray cluster run timed out after {CLUSTER_LIMIT_S} s (hung, not slow): {exc.output!r}"
        )


def _namespaces_work() -> bool:
    probe = ["unshare", "--user", "--map-root-user", "--net", "true"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


RAY_SCRIPT = """
set -u
ip -o addr > {d}/interfaces.txt
{python} -c 'import json, ray; ray.init(address="127.0.0.1:6380", logging_level="ERROR"); \
print(json.dumps([[n["NodeManagerAddress"], n["Alive"]] for n in ray.nodes()]))' > {d}/nodes.json
ss -ltnH > {d}/listening.txt
EDGE_EXPORT_KILL_AT=quantize:Q8_0:built {batch} > {d}/run1.txt 2>&1
echo $? > {d}/run1.rc
cp {d}/out/batch-report.json {d}/run1-report.json
cp {d}/out/batch-schedule.jsonl {d}/run1-schedule.jsonl
{batch} > {d}/run2.txt 2>&1
echo $? > {d}/run2.rc
"""


@pytest.mark.skipif(not _namespaces_work(), reason="needs unprivileged user and network namespaces (unshare)")
def test_ray_batch_survives_a_lost_worker_and_resumes_to_the_sequential_files(
    demo_inputs: DemoInputs, sequential: Sequential, tmp_path: Path
):
    """Two node processes on loopback; every stage on a fresh stage cache, so nothing is reused from the
    sequential runs; the first run loses the workers quantizing Q8_0 (killed when their file is built)."""
    plan = write_plan(tmp_path, demo_inputs, sequential, check_pirate=False)
    python = sys.executable
    batch = f"{python} -m exporter batch {plan} --executor ray --ray-address 127.0.0.1:6380"
    script = RAY_SCRIPT.format(d=tmp_path, python=python, batch=batch)
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        RAY=str(Path(python).parent / "ray"),
        EDGE_EXPORT_CACHE_DIR=str(tmp_path / "shared-cache"),
        COLUMNS="200",
    )
    proc = run_on_local_ray_cluster(script, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert [line.split()[1] for line in (tmp_path / "interfaces.txt").read_text().splitlines()] == [
        "lo",
        "lo",
    ]
    assert json.loads((tmp_path / "nodes.json").read_text()) == [["127.0.0.1", True], ["127.0.0.1", True]]
    listening = [line.split()[3] for line in (tmp_path / "listening.txt").read_text().splitlines()]
    assert listening and all(
        a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]", "*") for a in listening
    )

    # The first run: every merged export lost its Q8_0 worker and failed; the runtime group finished.
    assert (tmp_path / "run1.rc").read_text().strip() == "3", (tmp_path / "run1.txt").read_text()
    first = json.loads((tmp_path / "run1-report.json").read_text())
    for row in first["rows"]:
        if row["kind"] == "merged":
            assert row["status"] == "failed" and "quantize:Q8_0" in row["detail"] and "lost" in row["detail"]
        else:
            assert row["status"] == "ok"
    done = {e["stage"] for e in read_events(tmp_path / "run1-schedule.jsonl") if e["event"] == "end"}

    # The second run finishes, rebuilding only what the first did not finish.
    assert (tmp_path / "run2.rc").read_text().strip() == "0", (tmp_path / "run2.txt").read_text()
    out = tmp_path / "out"
    assert batch_hashes(out, sequential.hashes) == sequential.hashes
    for export in ("smollm2-pirate", "pirate-rslora", "pirate-alpha", "smollm2"):
        manifest = json.loads((out / export / "manifest.json").read_text())
        cached_stages = set(manifest["cached_stages"])
        built = set(manifest["stage_seconds"]) - cached_stages
        finished_before = {s.split("/", 1)[1] for s in done if s.startswith(f"{export}/")}
        assert not built & finished_before, (export, built & finished_before)
        # stops checks every GGUF of the export, so the rebuilt Q8_0 file is checked again.
        assert built == ({"quantize:Q8_0", "stops"} if export != "smollm2" else set())
    second = read_events(out / "batch-schedule.jsonl")
    assert {e["stage"] for e in second if e["event"] == "start"} == {
        e["stage"] for e in second if e["event"] == "end"
    }
