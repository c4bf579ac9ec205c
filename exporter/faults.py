"""A fault-injection hook for the interruption tests: SIGKILL this process at a named point.

Set EDGE_EXPORT_KILL_AT=POINT to be killed when the pipeline reaches POINT, or POINT+SECONDS to
be killed that many seconds after it (in the middle of the stage that starts there; child
processes die with their parent). Points: merge, merged, convert, converted, quantize:PROFILE,
quantized:PROFILE, modelfiles, manifest, check. Unset (always, outside those tests) it does nothing.
"""

from __future__ import annotations

import os
import signal
import threading

KILL_ENV = "EDGE_EXPORT_KILL_AT"


def kill_point(name: str) -> None:
    """Die by SIGKILL here (or after a delay) if EDGE_EXPORT_KILL_AT names this point."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, delay = spec.partition("+")
    if point != name:
        return
    if not delay:
        os.kill(os.getpid(), signal.SIGKILL)
    timer = threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
