"""Outputs never go into an input folder: the base's, an adapter's, or the folder of an input file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from exporter.core.errors import InputError


def cache_root() -> Path:
    """Where cached stages live: $EDGE_EXPORT_CACHE_DIR, else $XDG_CACHE_HOME/edge-export."""
    override = os.environ.get("EDGE_EXPORT_CACHE_DIR")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-export"


def refuse_output_in_inputs(
    out: Path,
    folders: Iterable[tuple[str, Path]],
    files: Iterable[tuple[str, Path | None]] = (),
    flag: str = "--out",
) -> None:
    """Refuse `out` when it is an input folder or inside one (`folders`: (what, folder)), or the folder that
    holds an input file (`files`: (what, file), None where not given), before anything is written."""
    target = out.resolve()
    for what, folder in folders:
        source = folder.resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise InputError(
                f"{flag} {out} {where} the {what} folder {folder}: outputs never go into an input folder, where "
                f"they would mix with (and could replace) the {what}'s own files. Choose an output folder outside "
                f"it, e.g. {source.parent / (source.name + '-export')}."
            )
    for what, file in files:
        if file is not None and target == file.resolve().parent:
            raise InputError(
                f"{flag} {out} is the folder that holds the {what} {file}: outputs never go beside an input "
                "file. Choose another output folder (one of its own)."
            )
