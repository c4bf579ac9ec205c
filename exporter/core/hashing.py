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

import json
import os
import threading
import time
from pathlib import Path

from converters.hashing import AppendHasher, file_identity, sha256_file

MEMO_FILE = "hashes.json"
MEMO_LIMIT = 20000  # entries kept; the least recently used go first
RACY_NS = 2_000_000_000  # coarser than any file system's modification-time granularity (FAT: 2 s)

__all__ = ["MEMO_FILE", "RACY_NS", "AppendHasher", "HashMemo", "hash_files", "sha256_file"]


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
        key, facts = file_identity(path.stat())
        with self._lock:
            known = self._entries.pop(key, None)
            if known is not None:
                self._entries[key] = known  # moved to the end: recently used
        if self.trust and known is not None and known[:2] == facts:
            return str(known[2])
        started = time.time_ns()
        digest = sha256_file(path)
        if file_identity(path.stat()) == (key, facts) and facts[1] < started - RACY_NS:
            self.record(path, digest)
        return digest

    def record(self, path: Path, digest: str) -> None:
        """Remember a digest computed elsewhere: a file this run wrote, hashed, and that nobody else writes."""
        key, facts = file_identity(path.stat())
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
