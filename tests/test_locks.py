"""File locks: two runs sharing an output folder or a stage cache wait for each other or fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.errors import BusyError
from exporter.locks import LockPolicy, hold_lock, output_lock_path
from tests.conftest import REPO, DemoExport, DemoInputs, export_args


def test_a_held_lock_refuses_or_times_out_and_is_removed_when_released(tmp_path: Path):
    lock = tmp_path / "x.lock"
    messages: list[str] = []
    with hold_lock(lock, "the thing", LockPolicy()):
        assert lock.read_text() == str(os.getpid())
        busy = r"the thing is in use by another edge-export run \(pid \d+\)"
        with pytest.raises(BusyError, match=busy), hold_lock(lock, "the thing", LockPolicy(wait=False)):
            pass
        start = time.monotonic()
        patient = LockPolicy(timeout=0.5, report=messages.append)
        with pytest.raises(BusyError, match="after waiting"), hold_lock(lock, "the thing", patient):
            pass
        assert time.monotonic() - start >= 0.5
        assert messages and messages[0].startswith("waiting for another edge-export run")
    assert not lock.exists()  # nothing left behind
    with hold_lock(lock, "the thing", LockPolicy(wait=False)):  # free again
        pass


def test_output_lock_lives_beside_the_output(tmp_path: Path):
    assert output_lock_path(tmp_path / "out") == tmp_path / ".out.edge-export.lock"
    deep = output_lock_path(tmp_path / "a" / "b" / "out")
    assert deep.parent == tmp_path and deep.name.startswith(".edge-export-")


def test_two_exports_at_once_on_one_cache_and_output(
    demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path: Path
):
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache), COLUMNS="200")
    args = [sys.executable, "-m", "exporter", *export_args(demo_inputs, out), "--no-check"]
    first = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lock = output_lock_path(out)
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists()
    refused = subprocess.run([*args, "--no-wait"], cwd=REPO, env=env, capture_output=True, text=True)
    message = " ".join(refused.stderr.split())
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"the output folder {out} is in use by another edge-export run (pid {first.pid})" in message
    second = subprocess.run([*args, "--force"], cwd=REPO, env=env, capture_output=True, text=True)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second.stderr
    assert "waiting for another edge-export run" in " ".join(second.stdout.split())
    manifest = json.loads((out / "manifest.json").read_text())
    # The second run waited, then reused every stage the first one built: same bytes as any other run.
    assert {"merge", "convert", "quantize Q4_K_M"} <= set(manifest["cached_stages"])
    expected = {a["profile"]: a["sha256"] for a in demo_export.manifest["artifacts"]}
    assert {a["profile"]: a["sha256"] for a in manifest["artifacts"]} == expected
    assert not lock.exists() and not list(cache.rglob("*.lock")) and not list(cache.rglob(".*partial*"))
