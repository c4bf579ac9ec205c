"""The error family, defined in converters.errors (converters must not import exporter) and re-exported
here so that library code and users keep one import path."""

from __future__ import annotations

from converters.errors import (
    BAD_INPUT_EXIT,
    GATE_FAILED_EXIT,
    INTERNAL_ERROR_EXIT,
    INTERRUPTED_EXIT,
    STAGE_FAILED_EXIT,
    BusyError,
    EnvironmentSetupError,
    ExportError,
    InputError,
    NativeCrashError,
    StageError,
)

__all__ = [
    "BAD_INPUT_EXIT",
    "GATE_FAILED_EXIT",
    "INTERNAL_ERROR_EXIT",
    "INTERRUPTED_EXIT",
    "STAGE_FAILED_EXIT",
    "BusyError",
    "EnvironmentSetupError",
    "ExportError",
    "InputError",
    "NativeCrashError",
    "StageError",
]
