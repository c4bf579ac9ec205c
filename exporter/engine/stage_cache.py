"""A content-addressed cache of pipeline stages: merged model, F16 GGUF, quantized GGUFs, quality.

An entry's key is the sha256 of everything that determines its bytes: the inputs' hashes, the
options that matter, and the versions of the tools that produce it. An entry is built in a
staging folder and renamed into place only when complete, with a `done.json` that records the
sha256 of every file, so an interrupted run (Ctrl-C, kill -9) never leaves an entry that looks
finished, and a finished entry is verified before it is reused (its files' sha256, read again only
for files whose inode, size or modification time changed: exporter.core.hashing.HashMemo). Outputs are hard-linked from the
cache into the output folder (copied across file systems), so a cached export costs no extra disk.

    <cache root>/stages/<kind>/<key>/{done.json, files…}

An entry may give up files nothing reads again (`release`: a merged model's weights once its 16-bit GGUF
exists, unless --keep-merged); it stays a valid entry for the files it keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.core.faults import kill_point
from exporter.core.hashing import MEMO_FILE, HashMemo, sha256_file
from exporter.core.locks import LockPolicy, hold_lock

DONE = "done.json"
FORMAT = 1


def stage_key(payload: dict[str, Any]) -> str:
    """The key of a stage: sha256 of its canonical JSON description."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **payload}, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class StageCache:
    """Stages under `root`; with `root=None` a throwaway cache (--no-cache) that `close` removes.

    `hashes` verifies entries and hashes inputs; with `rehash=True` it reads every file again."""

    def __init__(
        self,
        root: Path | None,
        scratch_parent: Path | None = None,
        lock_policy: LockPolicy | None = None,
        rehash: bool = False,
    ):
        self.persistent = root is not None
        self.lock_policy = lock_policy or LockPolicy()
        self.hashes = HashMemo(root / MEMO_FILE if root is not None else None, trust=not rehash)
        if root is None:
            parent = scratch_parent or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix=".edge-export-stages-", dir=parent))
        self.root = root / "stages" if self.persistent else root

    def close(self) -> None:
        self.hashes.save()
        if not self.persistent:
            shutil.rmtree(self.root, ignore_errors=True)

    def _lock_path(self, kind: str, key: str) -> Path:
        """The lock a run holds while it builds, releases or evicts the entry."""
        return self.root / kind / f".{key[:16]}.lock"

    def lookup(self, kind: str, key: str, verify: bool = True) -> CacheEntry | None:
        """A finished entry whose files still have the recorded hashes, or None."""
        folder = self.root / kind / key
        done = folder / DONE
        if not done.is_file():
            return None
        meta = json.loads(done.read_text())
        if verify:
            for name, digest in meta.get("files", {}).items():
                path = folder / name
                if not path.is_file() or self.hashes.sha256(path) != digest:
                    shutil.rmtree(folder, ignore_errors=True)  # damaged: rebuild rather than trust it
                    return None
        return CacheEntry(kind, key, folder, meta)

    @contextmanager
    def build(self, kind: str, key: str, label: str | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Yield a staging folder and a metadata dict to fill; publish both atomically when the block ends.

        The block may put in meta["files"] the sha256 of files it hashed while writing them (relative
        paths); the others are hashed here. `label` names the stage's fault point `<label>:built`
        (exporter.core.faults), reached when the block has ended and nothing is published yet."""
        parent = self.root / kind
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.partial-", dir=parent))
        staging.chmod(0o755)
        meta: dict[str, Any] = {}
        try:
            yield staging, meta
            if label is not None:
                kill_point(f"{label}:built")
            known = meta.pop("files", {})
            files = {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                name = path.relative_to(staging).as_posix()
                files[name] = digest = known.get(name) or sha256_file(path)
                self.hashes.record(path, digest)  # the rename below keeps the inode
            record = {**meta, "kind": kind, "created": time.time(), "files": files}
            (staging / DONE).write_text(json.dumps(record, indent=2) + "\n")
            final = parent / key
            if final.exists():  # built concurrently, or damaged and rebuilt
                shutil.rmtree(final, ignore_errors=True)
            try:
                staging.rename(final)
            except OSError:
                if not (final / DONE).is_file():  # not another run finishing the same entry first
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def get_or_build(
        self,
        kind: str,
        key: str,
        produce: Callable[[Path, dict[str, Any]], None],
        label: str | None = None,
    ) -> tuple[CacheEntry, bool]:
        """The verified entry for `key`, or one built now by `produce(staging, meta)`; and whether it was reused.

        The entry is locked meanwhile: a second run that needs it waits, then reuses what the first built.
        `label` is the stage's name in fault points (`<label>:built`, see `build`)."""
        lock = self._lock_path(kind, key)
        with hold_lock(lock, f"the cached {kind} stage {key[:12]}", self.lock_policy):
            entry = self.lookup(kind, key)
            if entry is not None:
                self.hashes.save()
                return entry, True
            for stale in (self.root / kind).glob(f".{key[:16]}.partial-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            with self.build(kind, key, label) as (staging, meta):
                produce(staging, meta)
        entry = self.lookup(kind, key, verify=False)  # just written and hashed
        assert entry is not None
        self.hashes.save()
        return entry, False

    def release(self, kind: str, key: str, names: list[str]) -> int:
        """Delete files of a finished entry that nothing will read again (a merged model's weights once its
        16-bit GGUF exists); the entry stays valid for the files it keeps, and its done.json lists the
        released ones under "released" with their sha256. Returns the bytes freed (the cache's copy;
        hard links elsewhere keep theirs until they go too)."""
        folder = self.root / kind / key
        lock = self._lock_path(kind, key)
        freed = 0
        with hold_lock(lock, f"the cached {kind} stage {key[:12]}", self.lock_policy):
            done = folder / DONE
            if not done.is_file():
                return 0
            meta = json.loads(done.read_text())
            files, released = dict(meta.get("files", {})), dict(meta.get("released", {}))
            for name in names:
                if name not in files:
                    continue
                released[name] = files.pop(name)
                path = folder / name
                if path.is_file():
                    freed += path.stat().st_size
                    path.unlink()
            partial = done.with_name(f".{DONE}.partial")
            partial.write_text(json.dumps({**meta, "files": files, "released": released}, indent=2) + "\n")
            partial.replace(done)
        return freed

    def evict(self, kind: str, key: str) -> None:
        """Remove one entry (a merged model whose weights were released, wanted again)."""
        lock = self._lock_path(kind, key)
        with hold_lock(lock, f"the cached {kind} stage {key[:12]}", self.lock_policy):
            shutil.rmtree(self.root / kind / key, ignore_errors=True)

    def entries(self) -> list[CacheEntry]:
        found: list[CacheEntry] = []
        if not self.root.is_dir():
            return found
        for done in sorted(self.root.glob(f"*/*/{DONE}")):
            folder = done.parent
            found.append(CacheEntry(folder.parent.name, folder.name, folder, json.loads(done.read_text())))
        return found

    def prune(self, older_than_days: float | None = None) -> tuple[int, int]:
        """Remove entries (all, or those older than the given age) and leftover partial folders."""
        removed = freed = 0
        cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
        for entry in self.entries():
            if cutoff is None or entry.meta.get("created", 0) < cutoff:
                freed += entry.size_bytes
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        # Leftovers of interrupted runs, and the references of versions that kept them outside the
        # stages (<cache>/reference/, before the reference became a stage like any other).
        legacy = self.root.parent / "reference"
        stale = [*self.root.glob("*/.*.partial-*"), *([legacy] if self.persistent else [])]
        for folder in (p for p in stale if p.is_dir()):
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        return removed, freed


def link_into(source: Path, target: Path) -> None:
    """Hard-link a cached file or folder to `target` (copy across file systems); replaces `target`."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    if source.is_dir():
        staging = target.with_name(f".{target.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, copy_function=_link_or_copy)
        staging.rename(target)
    else:
        partial = target.with_name(f".{target.name}.partial")
        partial.unlink(missing_ok=True)
        _link_or_copy(str(source), str(partial))
        partial.replace(target)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
