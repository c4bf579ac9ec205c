"""File locks (fcntl.flock) so two runs sharing an output folder or a stage cache entry never interleave.

A second run waits for the first (and says so), or, with --no-wait or once --lock-timeout
passes, fails with a message naming the lock and the process that holds it. Lock files are
removed when released, so nothing is left behind; a waiter that locked a file that was removed
in the meantime notices (another inode) and tries again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exporter.core.errors import BusyError, InputError

POLL_SECONDS = 0.2


@dataclass(frozen=True)
class LockPolicy:
    """What to do when another run holds a lock: wait (up to `timeout` seconds, None = for ever) or fail."""

    wait: bool = True
    timeout: float | None = None
    report: Callable[[str], None] | None = None


def output_lock_path(out: Path) -> Path:
    """The lock file of an output folder: beside it, so it neither lands in the export nor needs the folder."""
    out = out.absolute()
    if out.parent.is_dir():
        return out.parent / f".{out.name}.edge-export.lock"
    anchor = next((p for p in out.parents if p.is_dir()), Path("/"))
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return anchor / f".edge-export-{digest}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another edge-export run"
    return f"another edge-export run (pid {pid})" if pid else "another edge-export run"


@contextmanager
def hold_lock(path: Path, what: str, policy: LockPolicy) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed, removed on release) for the block."""
    start = time.monotonic()
    announced = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"Cannot create the lock file {path} for {what} ({exc.strerror}): the folder is not writable. "
                "Choose another location or fix its permissions."
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(path)
            waited = time.monotonic() - start
            if not policy.wait or (policy.timeout is not None and waited >= policy.timeout):
                after = f" after waiting {waited:.0f} s" if policy.wait else ""
                raise BusyError(
                    f"{what} is in use by {holder}{after} (lock file {path}). Wait for that run to finish, or "
                    "use another output folder; without --no-wait edge-export waits for it"
                    + (" (--lock-timeout sets how long)." if policy.wait else ".")
                ) from None
            if not announced and policy.report:
                policy.report(f"waiting for {holder} to release {what} ({path})")
            announced = True
            time.sleep(POLL_SECONDS)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: lock the new one
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
