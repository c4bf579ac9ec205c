"""One command's run over one output folder: the lock, the guard, the stage cache, versions, timings.

Every stage of every command goes through `Run.stage`: get-or-build in the content-addressed cache
(locked per entry, verified when reused), link the outputs into the output folder (claimed by the
guard, so a failed run removes what it wrote), time it, record whether it was reused, and pass the
fault points the interruption tests kill at (`<stage>`, `<stage>:built`, `<stage>:done`).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from converters.vendor import VendoredLlamaCpp, locate_vendored
from exporter.core.errors import InputError
from exporter.core.faults import kill_point
from exporter.core.locks import hold_lock, output_lock_path
from exporter.core.paths import cache_root
from exporter.core.version import __version__
from exporter.engine.graph import LocalExecutor, StageGraph
from exporter.engine.preflight import check_writable
from exporter.engine.stage_cache import CacheEntry, StageCache, link_into
from exporter.inputs.options import RunOptions

Reporter = Callable[[str], None]
Produce = Callable[[Path, dict[str, Any]], None]
VERSIONED = ("llama-cpp-python", "torch", "transformers", "peft", "safetensors", "gguf", "bitsandbytes")


def silent(_: str) -> None:
    """A reporter that says nothing (library use without a console)."""


def tool_versions(vendored: VendoredLlamaCpp) -> dict[str, str]:
    """edge-export's, llama.cpp's and every package's version that shapes an output."""
    versions = {"edge-export": __version__, "llama.cpp": vendored.commit}
    for package in VERSIONED:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class OutputGuard:
    """Tracks what a run writes into its output folder and removes it all if the run fails."""

    def __init__(self, out: Path):
        self.out = out
        self.created_out = not out.exists()
        self.paths: list[Path] = []
        self._lock = threading.Lock()

    def claim(self, path: Path) -> Path:
        with self._lock:
            self.paths.append(path)
        return path

    def rollback(self) -> None:
        for path in reversed(self.paths):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.created_out and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def check_output(out: Path, planned: list[Path], force: bool, finished_marker: str) -> None:
    """Refuse to replace a finished export (one with its manifest) without --force."""
    if out.exists() and not out.is_dir():
        raise InputError(f"The output path {out} exists and is not a folder. Choose another --out.")
    existing = [p for p in planned if p.exists()]
    # Without a manifest the files are what an interrupted run left: the new run replaces them.
    if existing and (out / finished_marker).exists() and not force:
        raise InputError(
            f"{existing[0]} already exists (and {len(existing) - 1} more of this run's outputs). Refusing to "
            "overwrite a finished export; pass --force to replace it, or choose another --out."
        )
    check_writable(out)


class Run:
    """The state one command's stages share; open it with `Run.open`."""

    def __init__(self, out: Path, options: RunOptions, report: Reporter, vendored: VendoredLlamaCpp):
        self.out = out
        self.options = options
        self.report = report
        self.vendored = vendored
        self.versions = tool_versions(vendored)
        self.guard = OutputGuard(out)
        out.mkdir(parents=True, exist_ok=True)
        self.cache = StageCache(
            cache_root() if options.use_cache else None,
            scratch_parent=out,
            lock_policy=options.lock,
            rehash=options.rehash,
        )
        if not options.use_cache:
            self.guard.claim(self.cache.root)
        self.seconds: dict[str, float] = {}
        self.reused: set[str] = set()
        self.built: set[str] = set()  # keys of the stages this run built (reusing one is no cache hit)
        self.started_utc = utc_now()

    @classmethod
    @contextmanager
    def open(
        cls,
        out: Path,
        options: RunOptions,
        report: Reporter = silent,
        lock: bool = True,
        before: Callable[[], None] | None = None,
        vendored: VendoredLlamaCpp | None = None,
    ) -> Iterator[Run]:
        """Hold the output folder's lock (unless `lock` is False: a scratch folder no other run can
        know), call `before` (the command's checks of the folder), and remove everything this run
        wrote if it fails or is interrupted."""
        policy = replace(options.lock, report=options.lock.report or report)
        options = replace(options, lock=policy)
        held = hold_lock(output_lock_path(out), f"the output folder {out}", policy) if lock else _nothing()
        with held:
            if before is not None:
                before()
            run = cls(out, options, report, vendored or locate_vendored())
            try:
                yield run
            except BaseException:  # Ctrl-C included: nothing half-done may stay behind
                run.guard.rollback()
                raise
            finally:
                run.cache.close()

    def stage(
        self, name: str, kind: str, key: str, produce: Produce, outputs: Mapping[str, Path] = {}
    ) -> CacheEntry:
        """Get or build one stage's cache entry, then link `outputs` (entry file -> output path)."""
        kill_point(name)
        start = time.perf_counter()
        entry, reused = self.cache.get_or_build(kind, key, produce, label=name)
        for relative, target in outputs.items():
            link_into(entry.path / relative, self.guard.claim(target))
        # A stage built earlier in this run under another name (a QLoRA merge candidate, then the kept
        # export) keeps the time it took to build and is not listed as reused from the cache.
        if not (reused and key in self.built and name in self.seconds):
            self.seconds[name] = round(time.perf_counter() - start, 3)
        if reused and key not in self.built:
            self.reused.add(name)
        elif not reused:
            self.built.add(key)
        kill_point(f"{name}:done")
        return entry

    def execute(self, graph: StageGraph) -> dict[str, Any]:
        """Run a command's graph on this machine, --jobs quantizations at a time; then the manifest's
        fault point (the manifest is written from these results, once)."""
        results = LocalExecutor(self.options.jobs).run(graph)
        kill_point("manifest")
        return results

    def replace_finished(self, paths: list[Path]) -> None:
        """--force: an earlier export's manifest and reports must not describe this one."""
        for stale in paths:
            stale.unlink(missing_ok=True)

    def cached_stages(self, order: list[str]) -> list[str]:
        """The stages reused from the cache, in the order the command's graph lists them."""
        return [name for name in order if name in self.reused]


@contextmanager
def _nothing() -> Iterator[None]:
    yield
