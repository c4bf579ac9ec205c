"""Atomic writes: a file appears under its final name only when it is complete."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (same suffix); renamed onto it if the block succeeds, removed if not."""
    partial = target.with_name(f".{target.stem}.partial{target.suffix}")
    try:
        yield partial
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_target(target) as partial:
        partial.write_text(text, encoding="utf-8", newline="\n")
