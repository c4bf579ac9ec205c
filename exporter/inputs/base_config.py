"""The base model's config.json: read once, the same way everywhere, and found for a base an adapter recorded.

Every reader of a base's config goes through `read_base_config`, so a broken file is refused with the
same message (the file, what is wrong, the fix) wherever it is first read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.core.jsonfile import read_json_object

CONFIG_FILE = "config.json"


def read_base_config(base_dir: Path) -> dict[str, Any]:
    """config.json of the model folder `base_dir` as a dict; InputError when it is not a JSON object."""
    return read_json_object(base_dir / CONFIG_FILE, "restore the base model's config.json.")


def recorded_base_config(hint: str | None) -> Path | None:
    """config.json of the base an adapter recorded (base_model_name_or_path), when it is on this machine:
    a folder, or a download in the Hub cache."""
    if not hint:
        return None
    if Path(hint).is_dir():
        path = Path(hint) / CONFIG_FILE
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hint, CONFIG_FILE)
    except Exception:  # noqa: BLE001 - an id that is not a valid repo name is simply not cached
        return None
    return Path(cached) if isinstance(cached, str) else None
