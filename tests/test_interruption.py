"""Kill -9 at the fault points of every stage (exporter/core/faults.py), then run again: the same bytes as an
uninterrupted run, and no temporary files left anywhere.

A run is killed when it reaches a point, never after a delay: `<stage>` before a stage starts,
`<stage>:built` with its output written into the stage cache's staging folder but not published,
`<stage>:done` once it is published and linked into the output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.core.faults import KILL_ENV
from exporter.core.hashing import sha256_file
from tests.conftest import REPO, DemoExport, DemoInputs, RuntimeExport, export_args, runtime_lora_args


def points(fast: list[str], slow: list[str]) -> list:
    return [*fast, *(pytest.param(point, marks=pytest.mark.slow) for point in slow)]


# The manifest is written once, after the check: a run killed anywhere, the check included, leaves
# no finished export, and the next run completes it from the cached stages. The runs killed before
# the check skip it (--no-check), which only adds time.
MERGE_QUANTIZE_CHECK = ["check", "reference:built", "quality:Q4_K_M:built", "quality:source:done"]
RUNTIME_LORA_CHECK = ["check", "reference:pirate-rslora:built", "quality:pirate-alpha:Q4_K_M:built"]
CHECK_POINTS = {*MERGE_QUANTIZE_CHECK, *RUNTIME_LORA_CHECK}
MERGE_QUANTIZE = points(
    ["merge:done", "quantize:Q4_K_M:built"],
    [
        "merge",
        "merge:built",
        "chat:built",
        "convert",
        "convert:built",
        "convert:done",
        "parity:built",
        "quantize:Q4_K_M",
        "quantize:Q4_K_M:done",
        "quantize:Q8_0:built",
        "modelfiles",
        "manifest",
        *MERGE_QUANTIZE_CHECK,
    ],
)
RUNTIME_LORA = points(
    ["lora:pirate-rslora:done", "quantize:Q4_K_M:built"],
    [
        "convert-base",
        "convert-base:built",
        "convert-base:done",
        "quantize:Q4_K_M",
        "quantize:Q4_K_M:done",
        "lora:pirate-rslora",
        "lora:pirate-alpha:built",
        "modelfiles",
        "manifest",
        *RUNTIME_LORA_CHECK,
    ],
)


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files: partial files and folders, lock files, probes, scratch caches, temp files."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if any(
                mark in path.name for mark in (".partial", ".lock", ".edge-export-")
            ) or path.name.startswith("tmp"):
                found.append(path)
    return found


def kill_then_resume(args: list[str], out: Path, point: str, tmp_path: Path) -> None:
    """Run `args` (writing `out`, caching in tmp_path) killed at `point`, then again to the end."""
    checked = point in CHECK_POINTS
    command = [sys.executable, "-m", "exporter", *args, *([] if checked else ["--no-check"])]
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(tmp_path / "cache"))
    killed = subprocess.run(command, cwd=REPO, env={**env, KILL_ENV: point}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (out / "manifest.json").exists()
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    if checked:
        assert json.loads((out / "report.json").read_text())["passed"] is True
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("point", MERGE_QUANTIZE)
def test_killed_export_resumes_to_identical_bytes(
    point: str, demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path: Path
):
    out = tmp_path / "out"
    kill_then_resume(export_args(demo_inputs, out), out, point, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    expected = demo_export.manifest
    assert [(a["profile"], a["sha256"]) for a in manifest["artifacts"]] == [
        (a["profile"], a["sha256"]) for a in expected["artifacts"]
    ]
    assert manifest["intermediates"][0]["sha256"] == expected["intermediates"][0]["sha256"]
    for modelfile in expected["modelfiles"]:
        assert (out / modelfile["path"]).read_text() == (demo_export.out / modelfile["path"]).read_text()


@pytest.mark.parametrize("point", RUNTIME_LORA)
def test_killed_runtime_lora_resumes_to_identical_bytes(
    point: str, demo_inputs: DemoInputs, runtime_export: RuntimeExport, tmp_path: Path
):
    out = tmp_path / "out"
    kill_then_resume(runtime_lora_args(demo_inputs, runtime_export.adapters, out), out, point, tmp_path)
    ggufs = sorted(path.name for path in runtime_export.out.glob("*.gguf"))
    assert sorted(path.name for path in out.glob("*.gguf")) == ggufs
    for name in ggufs:  # the base GGUFs and the adapter GGUFs
        assert sha256_file(out / name) == sha256_file(runtime_export.out / name), name
    for written in [*runtime_export.out.glob("*.Modelfile"), *runtime_export.out.glob("*.llama-server.json")]:
        assert (out / written.name).read_text() == written.read_text()
