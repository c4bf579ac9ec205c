"""Content hashes for inputs and artifacts, and a memo that spares re-hashing unchanged files.

Hashing a 1B model's inputs and cached stages means reading gigabytes; an unchanged re-run must not.
The memo remembers each file's sha256 under its device, inode, size and modification time (the
same facts make and git trust), in one JSON file in the cache folder. A file rewritten in place
gets a new modification time, and a replaced one a new inode, so either is hashed again. As in git,
a file modified less than RACY_NS before it was hashed is not remembered: a second write within the
file system's timestamp granularity could leave the same facts. `--rehash` ignores the memo and reads
every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

CHUNK = 8 << 20
MEMO_FILE = "hashes.json"
MEMO_LIMIT = 20000  # entries kept; the least recently used go first
RACY_NS = 2_000_000_000  # coarser than any file system's modification-time granularity (FAT: 2 s)


def sha256_file(path: Path) -> str:
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
            identity = _identity(os.fstat(handle.fileno()))
        if _identity(self.path.stat()) == identity:  # still the file that was read
            self._result = digest.hexdigest()

    def digest(self) -> str | None:
        """Call once the writer has exited: the file's sha256, or None if it could not be followed."""
        self._writer_done.set()
        self._thread.join()
        return self._result


def _identity(stat: os.stat_result) -> tuple[str, list[int]]:
    return f"{stat.st_dev}:{stat.st_ino}", [stat.st_size, stat.st_mtime_ns]


class HashMemo:
    """sha256 of files by (device, inode, size, mtime); persisted at `path`, or in memory when it is None.

    With `trust=False` every file is read again (and the memo refreshed with what was found). Stages
    running on threads share one memo: its entries are guarded by a lock (the hashing is not)."""

    def __init__(self, path: Path | None = None, trust: bool = True):
        self.path = path
        self.trust = trust
        self._entries: dict[str, list[int | str]] = {}
        self._changed = False
        self._lock = threading.Lock()
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                loaded = {}  # a damaged memo only costs hashing again
            if isinstance(loaded, dict):
                self._entries = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 3}

    def sha256(self, path: Path) -> str:
        key, facts = _identity(path.stat())
        with self._lock:
            known = self._entries.pop(key, None)
            if known is not None:
                self._entries[key] = known  # moved to the end: recently used
        if self.trust and known is not None and known[:2] == facts:
            return str(known[2])
        started = time.time_ns()
        digest = sha256_file(path)
        if _identity(path.stat()) == (key, facts) and facts[1] < started - RACY_NS:
            self.record(path, digest)
        return digest

    def record(self, path: Path, digest: str) -> None:
        """Remember a digest computed elsewhere: a file this run wrote, hashed, and that nobody else writes."""
        key, facts = _identity(path.stat())
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = [*facts, digest]
            self._changed = True

    def save(self) -> None:
        """Write the memo atomically; entries another run saved meanwhile are kept."""
        with self._lock:
            if self.path is None or not self._changed:
                return
            ours = dict(self._entries)
            self._changed = False
        merged: dict[str, list[int | str]] = {}
        if self.path.is_file():
            try:
                on_disk = json.loads(self.path.read_text())
                merged = on_disk if isinstance(on_disk, dict) else {}
            except (OSError, ValueError):
                merged = {}
        for key in ours:
            merged.pop(key, None)
        merged.update(ours)
        kept = dict(list(merged.items())[-MEMO_LIMIT:])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_text(json.dumps(kept))
        partial.replace(self.path)


def hash_files(paths: list[Path], root: Path, memo: HashMemo | None = None) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to root (sorted, so the result is stable)."""
    digest = memo.sha256 if memo is not None else sha256_file
    return {p.relative_to(root).as_posix(): digest(p) for p in sorted(paths)}
