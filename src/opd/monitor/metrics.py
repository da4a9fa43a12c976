"""Metrics sinks: one JSON object per step in RUN/metrics.jsonl, and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, resume_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept: list[str] = []
        if resume_after_step is not None and self.path.exists():
            # Rows written after the checkpoint we resume from are recomputed, never duplicated.
            # A torn last line (a crash mid-write) is dropped rather than failing the resume.
            steps = [(ln, _step_of(ln)) for ln in self.path.read_text().splitlines()]
            kept = [ln for ln, step in steps if step is not None and step <= resume_after_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))  # a fresh run starts a fresh file
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events with step >= it: keep the checkpoint step itself, as metrics.jsonl does; a
            # fresh start (a resume that found no intact checkpoint among them) keeps none, as its new file does.
            purge = 0 if resume_after_step is None else resume_after_step + 1
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, clean["step"])
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    try:
        row = json.loads(line)
        return row["step"] if isinstance(row, dict) else None
    except (json.JSONDecodeError, KeyError):
        return None


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf; None reads as "not measurable this step"
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
