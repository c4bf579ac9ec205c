"""The one error family library code raises; only the CLI turns these into messages and exit codes.

Defined here, at the bottom layer, because the converters raise it too; exporter.core.errors re-exports it.
"""

from __future__ import annotations

# Exit codes, as README's table gives them. 1 is only ever a failed quality gate or check.
GATE_FAILED_EXIT = 1
BAD_INPUT_EXIT = 2
STAGE_FAILED_EXIT = 3
INTERNAL_ERROR_EXIT = 4
INTERRUPTED_EXIT = 130


class ExportError(Exception):
    """Base of every error edge-export reports to a user.

    The message is one paragraph: what was wrong, the file it concerns, and the fix.
    `exit_code` is what the CLI exits with (2 for bad input, 3 for a failed stage; a failed quality
    gate is 1 and an internal error 4, neither of which is an ExportError).
    """

    exit_code = BAD_INPUT_EXIT


class InputError(ExportError):
    """An input (adapter, base model, option, profile file) is missing or invalid."""


class EnvironmentSetupError(ExportError):
    """The installation is incomplete or inconsistent (vendored converter, llama-cpp-python)."""


class StageError(ExportError):
    """A pipeline stage (convert, quantize, evaluate) failed on valid input."""

    exit_code = STAGE_FAILED_EXIT


class NativeCrashError(StageError):
    """llama.cpp crashed in a child process; the CLI survived and reports it."""


class BusyError(ExportError):
    """Another run holds the output folder or a stage cache entry (and we were told not to wait longer)."""
