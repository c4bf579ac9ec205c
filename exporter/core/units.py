"""Byte sizes as people read them, in binary units (1 MiB = 2^20 bytes), formatted in one place.

Two styles, on purpose: `human_size` picks the unit (tables of files, disk plans, budgets), and the
fixed-unit forms keep a column or an estimate in one unit, so rows compare at a glance.
"""

from __future__ import annotations

import re

MiB = 1 << 20
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """`2GB`, `500MB`, `1.5GiB`, `1000000` as bytes (binary units either way); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def human_size(size: int) -> str:
    """`512 B`, `351.9 KiB`, `100.6 MiB`, `2.2 GiB`: the largest unit under 1024 of it, one decimal."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in UNITS[1:-1]:
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {UNITS[-1]}"


def mib(size: int) -> str:
    """`100.6 MiB`: a file size in a report's MiB column."""
    return f"{size / MiB:.1f} MiB"


def whole_mib(size: int) -> str:
    """`1,234 MiB`: a memory estimate, to the nearest MiB."""
    return f"{size / MiB:,.0f} MiB"
