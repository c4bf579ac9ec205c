"""stops: for each exported GGUF, the template's turn terminator against the GGUF's end-of-generation
tokens, and a bounded greedy chat reply that must end at one of them (converters.stop_tokens)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from converters.stop_tokens import StopCheck, check_stops
from exporter.core.version import __version__
from exporter.engine.run import Run
from exporter.engine.stage_keys import stops_key

STOP_MAX_TOKENS = 64


def stops_stage(
    run: Run, ggufs: dict[str, tuple[Path, str]], terminator: str | None, prompt: str, name: str = "stops"
) -> dict[str, StopCheck]:
    """`ggufs`: label -> (path, sha256). Cached on the files' hashes, the terminator and the prompt."""

    def produce(staging: Path, meta: dict[str, Any]) -> None:
        run.report("checking that each GGUF stops at the template's end of turn")
        checks = {
            label: asdict(check_stops(path, terminator, prompt, STOP_MAX_TOKENS))
            for label, (path, _) in ggufs.items()
        }
        meta.update(checks=checks, what="stop tokens")

    hashes = {label: sha for label, (_, sha) in ggufs.items()}
    key = stops_key(hashes, terminator, prompt, STOP_MAX_TOKENS, __version__)
    entry = run.stage(name, "stops", key, produce)
    return {
        label: StopCheck(**{**c, "terminator_ids": tuple(c["terminator_ids"]), "eog": tuple(c["eog"])})
        for label, c in entry.meta["checks"].items()
    }


def stops_to_json(checks: dict[str, StopCheck]) -> dict[str, Any]:
    return {label: {**asdict(c), "passed": c.passed} for label, c in checks.items()}
