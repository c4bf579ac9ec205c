"""A JSON file that must hold one object (a config, an adapter's config): read with the file and the fix in every error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from exporter.core.errors import InputError


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """`path` parsed as a JSON object; InputError naming the file, what is wrong and `fix` otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object; {fix}")
    return data
