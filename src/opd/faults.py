"""RunAborted (a run that cannot go on), and crash points for the reliability tests. OPD_CRASH_AT="phase:step"
makes the process SIGKILL itself when it reaches that point, so a test can stop a real run in every phase (rollout,
teacher scoring, update, metrics, in the middle of writing a checkpoint, ...) and check that
--resume ends exactly where an uninterrupted run ends. Unset, it costs one string compare."""

from __future__ import annotations

import os
import signal

_CRASH_AT = os.environ.get("OPD_CRASH_AT", "")


class RunAborted(Exception):
    """The run cannot go on (numbers stayed non-finite, a worker was lost for good); what resumes was written."""


def crash_point(phase: str, step: int) -> None:
    if _CRASH_AT and _CRASH_AT == f"{phase}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def worker_crash_point(phase: str, step: int) -> None:
    """For the Ray failure tests: OPD_WORKER_CRASH_AT="rollout:2,teacher:3" makes the worker that reaches that point
    SIGKILL itself, once per point (the marker file OPD_WORKER_CRASH_ONCE.<phase>-<step> records that it happened,
    so the restarted worker that retries the call goes through)."""
    points = os.environ.get("OPD_WORKER_CRASH_AT", "")
    if not points or f"{phase}:{step}" not in points.split(","):
        return
    marker = os.environ.get("OPD_WORKER_CRASH_ONCE", "") + f".{phase}-{step}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
