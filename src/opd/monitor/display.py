"""Live terminal view of a run: progress and the three health signals (rich), or plain lines
when the output is not an interactive terminal (CI, log files)."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from opd.config import MonitorConfig
from opd.monitor.health import LEVELS, Signal, assess


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


class RunDisplay:
    def __init__(self, cfg: MonitorConfig, total_steps: int, start_step: int = 0, console: Console | None = None):
        self.cfg = cfg
        self.console = console or Console()
        # a dumb terminal (TERM=dumb: Emacs shells, some CI) is a terminal rich never redraws: lines there
        live = cfg.live == "on" or (cfg.live == "auto" and self.console.is_interactive)
        self.progress = Progress(
            TextColumn("[bold]opd[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("steps", total=total_steps, completed=start_step)
        self.total = total_steps
        self.last_eval: dict = {}
        self.signals: list[Signal] = []
        self._live = Live(self._render(), console=self.console, refresh_per_second=4) if live else None
        self._t0 = time.time()

    def __enter__(self):
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live:
            self._live.__exit__(*exc)
            if not self.console.is_terminal:  # written once into a file or pipe: end its last line
                self.console.line()

    def update(self, row: dict) -> None:
        self.signals = assess(row, self.cfg)
        if any(k.startswith("eval/") for k in row):
            self.last_eval = {k: v for k, v in row.items() if k.startswith("eval/")}
        if "rollout/tokens" in row:
            self.progress.update(self.task, completed=row["step"])
        if self._live:
            self._live.update(self._render())
        elif row["step"] % self.cfg.log_every == 0 or row["step"] == self.total or "rollout/tokens" not in row:
            self.console.print(self._line(row), highlight=False, soft_wrap=True)

    def _line(self, row: dict) -> str:
        parts = [f"step {row['step']}/{self.total}"]
        for s in self.signals:
            vals = " ".join(f"{label}={_fmt(v)}" for label, v, _ in s.items if v is not None)
            if not vals:  # nothing measured yet (step 0's row holds the first evaluation only)
                continue
            # the level in words too: colour is lost in a log file or CI output, where these lines go
            level = "" if s.level == 0 else f" ({s.colour})"
            parts.append(f"[{s.colour}]{s.name}{level}[/{s.colour}]: {vals}")
        if any(k.startswith("eval/") for k in row):
            parts.append("eval: " + " ".join(f"{k[5:]}={_fmt(v)}" for k, v in row.items() if k.startswith("eval/")))
        return " | ".join(parts)

    def _render(self):
        table = Table.grid(padding=(0, 2))
        for s in self.signals:
            body = "  ".join(
                f"[{LEVELS[lvl]}]{label} {_fmt(v)}[/{LEVELS[lvl]}]" for label, v, lvl in s.items
            )
            table.add_row(f"[bold {s.colour}]● {s.name}[/]", body)
        if self.last_eval:
            table.add_row("[bold]Eval[/]", "  ".join(f"{k[5:]} {_fmt(v)}" for k, v in self.last_eval.items()))
        return Panel(Group(self.progress, table), title="on-policy distillation", border_style="blue")
