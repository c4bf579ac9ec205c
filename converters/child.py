"""Run llama.cpp work in a child Python process, so a native crash becomes an error.

The parent writes a JSON request file, the child (`python -m <module> REQUEST RESPONSE`) writes a
JSON response file. A child killed by a signal raises NativeCrashError with the signal's name and
the tail of the child's stderr; a child that raised raises StageError with the same tail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters.errors import ExportError, NativeCrashError, StageError

STDERR_TAIL = 2500


def die_with_parent() -> None:
    """preexec_fn for children: on Linux, SIGKILL the child when the parent dies (even by kill -9),
    so an interrupted export leaves no converter or quantizer running on its own."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def stderr_tail(text: str, limit: int = STDERR_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def run_child(
    module: str, request: dict[str, Any], what: str, timeout: float | None = None
) -> dict[str, Any]:
    """Run `python -m module` on a request; return its response or raise a clear error."""
    with tempfile.TemporaryDirectory(prefix="edge-export-child-") as scratch:
        request_file = Path(scratch) / "request.json"
        response_file = Path(scratch) / "response.json"
        request_file.write_text(json.dumps(request))
        env = dict(os.environ, PYTHONFAULTHANDLER="1")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", module, str(request_file), str(response_file)],
                capture_output=True,
                preexec_fn=die_with_parent,
                text=True,
                timeout=timeout,
                env=env,
                errors="replace",
            )
        except subprocess.TimeoutExpired as exc:
            raise StageError(f"{what} did not finish within {timeout:.0f} s and was stopped.") from exc
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            raise NativeCrashError(
                f"{what} crashed inside llama.cpp ({name}); edge-export itself is fine and other "
                f"artifacts of this run are unaffected. Child stderr:\n{stderr_tail(proc.stderr)}"
            )
        if not response_file.is_file():
            raise StageError(
                f"{what} failed (exit code {proc.returncode}). Child stderr:\n{stderr_tail(proc.stderr)}"
            )
        response = json.loads(response_file.read_text())
        if "error" in response:
            error_class = StageError if response.get("kind") != "input" else ExportError
            raise error_class(f"{what} failed: {response['error']}")
        return response


def child_main(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a child: read the request, call handler, write the response."""
    request_file, response_file = Path(sys.argv[1]), Path(sys.argv[2])
    request = json.loads(request_file.read_text())
    try:
        response = handler(request)
    except ChildInputError as exc:
        response = {"error": str(exc), "kind": "input"}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a stage failure
        response = {"error": f"{type(exc).__name__}: {exc}"}
        if "Shared library with base name" in str(exc) or "Failed to load shared library" in str(exc):
            from converters.llama_tools import FIX

            response["error"] += f". llama-cpp-python has no working llama.cpp libraries; {FIX}."
    response_file.write_text(json.dumps(response))


class ChildInputError(Exception):
    """Raised in a child for a problem with the input file rather than with llama.cpp."""
