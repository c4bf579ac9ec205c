"""sha256 of files, including one another process is still writing (the converter's F16 GGUF).

exporter.core.hashing builds its memo of file hashes on these.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in CHUNK-sized blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class AppendHasher:
    """sha256 of a file that another process writes from start to end, read while it grows.

    The F16 GGUF of a 1B model is gigabytes; hashing it while the converter writes it uses the core
    the converter leaves idle instead of reading it all again afterwards. The file must be new and
    written only by appending (the vendored GGUF writer opens it once and writes header, metadata,
    tensor infos and tensor data in order; the demo pipeline's tests check the digest against the
    file). `digest()` returns None, and the caller hashes the file afterwards, when the file was
    replaced, or was seen shorter than what had been read; a rewrite that restores the length
    between two looks cannot be seen, which is why only append-only writers may be followed."""

    POLL_S = 0.02

    def __init__(self, path: Path):
        self.path = path
        self._writer_done = threading.Event()
        self._result: str | None = None
        self._thread = threading.Thread(target=self._follow, name=f"hash {path.name}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self.path.exists():
            if self._writer_done.is_set():
                return
            time.sleep(self.POLL_S)
        digest, read = hashlib.sha256(), 0
        with self.path.open("rb") as handle:
            while True:
                block = handle.read(CHUNK)
                if block:
                    digest.update(block)
                    read += len(block)
                    continue
                finished = self._writer_done.is_set()
                size = os.fstat(handle.fileno()).st_size
                if size < read:  # truncated and rewritten: what was read is not the file
                    return
                if finished and size == read:
                    break
                if not finished:
                    time.sleep(self.POLL_S)
            identity = file_identity(os.fstat(handle.fileno()))
        if file_identity(self.path.stat()) == identity:  # still the file that was read
            self._result = digest.hexdigest()

    def digest(self) -> str | None:
        """Call once the writer has exited: the file's sha256, or None if it could not be followed."""
        self._writer_done.set()
        self._thread.join()
        return self._result


def file_identity(stat: os.stat_result) -> tuple[str, list[int]]:
    """What tells one version of a file from another: ("device:inode", [size, mtime_ns])."""
    return f"{stat.st_dev}:{stat.st_ino}", [stat.st_size, stat.st_mtime_ns]
