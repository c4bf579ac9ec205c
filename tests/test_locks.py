"""File locks: two runs sharing an output folder or a stage cache wait for each other or fail clearly.

The tests synchronise on the lock itself, never on time: the test holds a lock, a run says on its
output that it waits for it, the test releases it. Deadlines only turn a hang into a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from exporter.core.errors import BusyError
from exporter.core.locks import LockPolicy, hold_lock, output_lock_path
from tests.conftest import EXPORT_STAGES, REPO, DemoExport, DemoInputs, export_args

WAITING = "waiting for another edge-export run"
DEADLINE_S = 600  # a failure guard: a run that never says it waits, or never finishes


def test_a_waiting_run_announces_itself_and_takes_the_lock_when_released(tmp_path: Path):
    lock = tmp_path / "x.lock"
    holder = ExitStack()
    holder.enter_context(hold_lock(lock, "the thing", LockPolicy()))
    assert lock.read_text() == str(os.getpid())
    busy = r"the thing is in use by another edge-export run \(pid \d+\)"
    with pytest.raises(BusyError, match=busy), hold_lock(lock, "the thing", LockPolicy(wait=False)):
        pass
    messages: list[str] = []

    def release_when_told(message: str) -> None:  # the holder finishes once the waiter has said it waits
        messages.append(message)
        holder.close()

    with hold_lock(lock, "the thing", LockPolicy(report=release_when_told)):
        assert lock.read_text() == str(os.getpid())
    assert len(messages) == 1 and messages[0].startswith(
        f"{WAITING} (pid {os.getpid()}) to release the thing"
    )
    assert not lock.exists()  # nothing left behind
    with hold_lock(lock, "the thing", LockPolicy(wait=False)):  # free again
        pass


def test_a_lock_timeout_gives_up_no_sooner_than_asked(tmp_path: Path):
    lock = tmp_path / "x.lock"
    with hold_lock(lock, "the thing", LockPolicy()):
        start = time.monotonic()
        patient = LockPolicy(timeout=0.5)
        with pytest.raises(BusyError, match="after waiting"), hold_lock(lock, "the thing", patient):
            pass
        assert time.monotonic() - start >= 0.5
    assert not lock.exists()


def test_output_lock_lives_beside_the_output(tmp_path: Path):
    assert output_lock_path(tmp_path / "out") == tmp_path / ".out.edge-export.lock"
    deep = output_lock_path(tmp_path / "a" / "b" / "out")
    assert deep.parent == tmp_path and deep.name.startswith(".edge-export-")


class Run:
    """The real command line in a child process, its output read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exporter", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._waiting = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if WAITING in line:
                self._waiting.set()

    def wait_until_waiting(self) -> None:
        """Return once the run has said it waits for a lock (or fail, if it ends or hangs first)."""
        assert self._waiting.wait(DEADLINE_S), self.output()

    def finish(self) -> int:
        code = self.process.wait(DEADLINE_S)
        for reader in self._readers:
            reader.join(DEADLINE_S)
        return code

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:  # a failed test leaves no run behind
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_runs_on_a_held_output_folder_wait_or_are_refused_then_reuse_each_others_stages(
    demo_inputs: DemoInputs, demo_export: DemoExport, tmp_path: Path
):
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, EDGE_EXPORT_CACHE_DIR=str(cache), COLUMNS="1000", PYTHONUNBUFFERED="1")
    args = [*export_args(demo_inputs, out), "--no-check", "--force"]
    lock = output_lock_path(out)
    held = ExitStack()
    held.enter_context(hold_lock(lock, f"the output folder {out}", LockPolicy()))
    with held, Run(args, env) as first, Run(args, env) as second:
        first.wait_until_waiting()
        second.wait_until_waiting()
        refused = subprocess.run(
            [sys.executable, "-m", "exporter", *args, "--no-wait"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        message = " ".join(refused.stderr.split())
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"the output folder {out} is in use by another edge-export run (pid {os.getpid()})" in message
        assert not out.exists()  # neither waiting run has started
        held.close()  # the waiting runs go on
        assert first.finish() == 0, first.output()
        assert second.finish() == 0, second.output()
    # One run built every stage; the other waited for it, then reused them all: the manifest is the
    # later run's, and its bytes are any run's.
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["cached_stages"]) == EXPORT_STAGES
    expected = {a["profile"]: a["sha256"] for a in demo_export.manifest["artifacts"]}
    assert {a["profile"]: a["sha256"] for a in manifest["artifacts"]} == expected
    assert not lock.exists() and not list(cache.rglob("*.lock")) and not list(cache.rglob(".*partial*"))
