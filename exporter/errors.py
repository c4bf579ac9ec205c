"""The one error family library code raises; only the CLI turns these into messages and exit codes."""

from __future__ import annotations


class ExportError(Exception):
    """Base of every error edge-export reports to a user.

    The message is one paragraph: what was wrong, the file it concerns, and the fix.
    `exit_code` is what the CLI exits with (2 for bad input, 1 for a failed check).
    """

    exit_code = 2


class InputError(ExportError):
    """An input (adapter, base model, option, profile file) is missing or invalid."""


class EnvironmentSetupError(ExportError):
    """The installation is incomplete or inconsistent (vendored converter, llama-cpp-python)."""


class StageError(ExportError):
    """A pipeline stage (convert, quantize, evaluate) failed on valid input."""

    exit_code = 3


class NativeCrashError(StageError):
    """llama.cpp crashed in a child process; the CLI survived and reports it."""


class BusyError(ExportError):
    """Another run holds the output folder or a stage cache entry (and we were told not to wait longer)."""
