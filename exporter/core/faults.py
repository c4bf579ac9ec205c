"""A fault-injection hook for the interruption tests: SIGKILL this process at a named point.

Set EDGE_EXPORT_KILL_AT=POINT to be killed when the run reaches POINT. Unset (always, outside those
tests) it does nothing. Every stage has three points:

    <stage>        before the stage starts (or finds its entry in the stage cache)
    <stage>:built  its output fully written into the stage cache's staging folder, not yet published:
                   a kill here leaves a partial staging folder that the next run must clean up
    <stage>:done   published in the stage cache and linked into the output folder

Stages of merge-quantize: merge, convert, chat, parity, imatrix, quantize:<PROFILE>, reference,
quality:source (the unquantized GGUF), quality:<PROFILE>. Stages of runtime-lora: convert-base,
quantize:<PROFILE> (the base's), lora:<ADAPTER>, reference:<ADAPTER>, quality:<ADAPTER>:<PROFILE>,
and with --compare-merged merge:<ADAPTER>, convert:<ADAPTER>, quantize:<ADAPTER>:<PROFILE>,
merged:<ADAPTER>:<PROFILE>. Both commands also have three run-level points, each reached before
that step: modelfiles, check, manifest.

A batch reaches every export's points under the same names (each export's quantize:Q8_0 is the same
point), in the Ray workers too (the driver passes EDGE_EXPORT_KILL_AT on to them), where a kill is a
lost worker; and the run-level point manifest once, before the exports' manifests are written.

A point is reached only where the run does that work: a stage reused from the cache reaches
<stage> and <stage>:done but not <stage>:built. Points are killed at when reached, never after a
delay: the former POINT+SECONDS form raced the stage it meant to interrupt, and is refused (an
InputError, exit 2) at the first point the run reaches.
"""

from __future__ import annotations

import os
import signal

from exporter.core.errors import InputError

KILL_ENV = "EDGE_EXPORT_KILL_AT"


def kill_point(name: str) -> None:
    """Die by SIGKILL here if EDGE_EXPORT_KILL_AT names this point."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    if "+" in spec:
        raise InputError(
            f"{KILL_ENV}={spec}: the POINT+SECONDS form was removed; a run is killed only at a point it "
            "reaches. Name a point, e.g. quantize:Q4_K_M:built (see exporter/core/faults.py)."
        )
    if spec == name:
        os.kill(os.getpid(), signal.SIGKILL)
