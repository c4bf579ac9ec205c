"""imatrix: the importance matrix computed on the merged model from --calibration, or the one given
with --imatrix (checked against the F16 GGUF), published as <name>.imatrix.gguf."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.engine.run import Run
from exporter.engine.stage_keys import given_imatrix_key, imatrix_key
from exporter.quality.imatrix import ImatrixStage, activation_dtype, compute_imatrix, read_imatrix_file

IMATRIX_FILE = "imatrix.gguf"
# What the manifest records of an importance matrix ("dataset" only for a given one).
IMATRIX_RECORD = ("entries", "tokens", "chunks", "dataset", "skipped", "seconds", "dtype")


def computed_imatrix_stage(
    run: Run, calibration: Path, max_tokens: int, merged_dir: Path, f16: Path, convert: str, name: str
) -> ImatrixStage:
    """The matrix of activations of the merged model on the calibration data (cached per F16 GGUF)."""
    calibration_sha256 = run.cache.hashes.sha256(calibration)
    dtype = activation_dtype(merged_dir)
    key = imatrix_key(convert, calibration_sha256, max_tokens, dtype, run.versions)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"computing the importance matrix from {calibration}")
        result = compute_imatrix(
            merged_dir,
            f16,
            calibration,
            staging / IMATRIX_FILE,
            run.vendored,
            max_tokens=max_tokens,
            threads=run.options.threads,
            dtype=dtype,
        )
        meta.update(result.to_json(), what=f"{name} importance matrix")

    return _publish(run, name, key, produce, calibration, calibration_sha256)


def given_imatrix_stage(run: Run, given: Path, f16: Path, convert: str, name: str) -> ImatrixStage:
    """--imatrix FILE: checked against this model's F16 GGUF once, then cached like a computed one."""
    given_sha256 = run.cache.hashes.sha256(given)
    key = given_imatrix_key(convert, given_sha256)

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report(f"checking the importance matrix {given}")
        info = read_imatrix_file(given, f16)
        shutil.copyfile(given, staging / IMATRIX_FILE)
        meta.update(info, what=f"{name} importance matrix (given)", files={IMATRIX_FILE: given_sha256})

    return _publish(run, name, key, produce, given, given_sha256, given=True)


def _publish(
    run: Run,
    name: str,
    key: str,
    produce: Callable[[Path, dict[str, Any]], None],
    source: Path,
    source_sha256: str,
    given: bool = False,
) -> ImatrixStage:
    output = run.out / f"{name}.imatrix.gguf"
    entry = run.stage("imatrix", "imatrix", key, produce, {IMATRIX_FILE: output})
    return ImatrixStage(
        key,
        entry.path / IMATRIX_FILE,
        output,
        entry.meta["files"][IMATRIX_FILE],
        source,
        source_sha256,
        {k: entry.meta[k] for k in IMATRIX_RECORD if k in entry.meta},
        "imatrix" in run.reused,
        given=given,
    )
