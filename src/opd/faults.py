"""Crash points for the reliability tests. OPD_CRASH_AT="phase:step" makes the process SIGKILL
itself when it reaches that point, so a test can stop a real run in every phase (rollout,
teacher scoring, update, metrics, in the middle of writing a checkpoint, ...) and check that
--resume ends exactly where an uninterrupted run ends. Unset, it costs one string compare."""

from __future__ import annotations

import os
import signal

_CRASH_AT = os.environ.get("OPD_CRASH_AT", "")


def crash_point(phase: str, step: int) -> None:
    if _CRASH_AT and _CRASH_AT == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
