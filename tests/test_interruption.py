"""Kill -9 at each stage boundary and in the middle of stages, then run again: the same bytes as an
uninterrupted run, and no temporary files left anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.faults import KILL_ENV
from tests.conftest import REPO, DemoExport, DemoInputs, export_args

FAST = ["merged", "quantize:Q4_K_M+1.5"]
SLOW = [
    "merge",
    "merge+0.5",
    "convert",
    "convert+3",
    "converted",
    "quantize:Q4_K_M",
    "quantized:Q4_K_M",
    "quantize:Q8_0+1",
    "modelfiles",
]
POINTS = [*FAST, *(pytest.param(point, marks=pytest.mark.slow) for point in SLOW)]


def leftovers(*folders: Path) -> list[Path]:
    """Temporary files: partial files and folders, lock files, probes, scratch caches."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if any(mark in path.name for mark in (".partial", ".lock", ".edge-export-")):
                found.append(path)
    return found


@pytest.mark.parametrize("point", POINTS)
def test_killed_run_resumes_to_identical_bytes(
    point: str, demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path: Path
):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = [sys.executable, "-m", "exporter", *export_args(demo_inputs, out), "--no-check"]
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache))
    killed = subprocess.run(args, cwd=REPO, env={**env, KILL_ENV: point}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (out / "manifest.json").exists()
    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    expected = demo_export.manifest
    assert [(a["profile"], a["sha256"]) for a in manifest["artifacts"]] == [
        (a["profile"], a["sha256"]) for a in expected["artifacts"]
    ]
    assert manifest["intermediates"][0]["sha256"] == expected["intermediates"][0]["sha256"]
    for modelfile in expected["modelfiles"]:
        assert (out / modelfile["path"]).read_text() == (demo_export.out / modelfile["path"]).read_text()
    assert leftovers(tmp_path) == []
