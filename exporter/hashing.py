"""Content hashes for inputs and artifacts."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: list[Path], root: Path) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to root (sorted, so the result is stable)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(paths)}
