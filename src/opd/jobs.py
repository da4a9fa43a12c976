"""Independent runs (the seeds and methods of `opd compare`) on several processes at once.

A small model cannot use more than a core or so per step — the step time is Python and per-op overhead, not
arithmetic — so two single-threaded runs side by side finish about twice as fast as one after the other on two
cores. Each job is a whole `opd run` folder: a finished one is skipped, an interrupted one resumes.
"""

from __future__ import annotations

import multiprocessing
import os
from contextlib import redirect_stderr, redirect_stdout
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from opd.config import Config, ConfigError, load_config


def check_reusable(out: Path, cfg: Config) -> None:
    """A run folder made earlier is reused (finished) or resumed (interrupted) only if it ran these settings: a
    report would otherwise describe settings its runs never had."""
    recorded = Path(out) / "config.toml"
    if not recorded.is_file():
        return
    old, new = load_config(recorded).model_dump(mode="json"), cfg.model_dump(mode="json")
    if old != new:
        diff = [f"{k}: {old_v!r} -> {new_v!r}" for k, old_v, new_v in _differences(old, new)]
        raise ConfigError(f"{out} holds a run with other settings ({'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''}); "
                          "give this comparison another --out, or delete that folder to run it again")


def _differences(old, new, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in dict.fromkeys([*old, *new]):
            yield from _differences(old.get(k), new.get(k), f"{prefix}{k}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


class JobsInterrupted(Exception):
    """A run stopped on Ctrl-C / SIGTERM (checkpoint written): the jobs after it are not run, and nothing may read
    the stopped run as finished."""


@dataclass
class RunJob:
    name: str
    cfg: Config
    out: Path
    mode: str = "onpolicy"

    @property
    def done(self) -> bool:
        return (self.out / "final" / "model.safetensors").is_file()


def run_jobs(jobs: list[RunJob], n_jobs: int, log=print) -> None:
    """Runs every unfinished job: in this process when n_jobs <= 1, else on n_jobs worker processes, each
    with cores // n_jobs torch threads and its console output in RUN/console.log."""
    for j in jobs:
        check_reusable(j.out, j.cfg)
    todo = [j for j in jobs if not j.done]
    if n_jobs <= 1 or len(todo) <= 1:
        from opd.loop import run

        for j in todo:
            log(f"--- {j.name}")
            if run(j.cfg, j.out, log=log, mode=j.mode, resume=(j.out / "checkpoints").is_dir()).interrupted:
                raise JobsInterrupted(f"{j.name} was interrupted (its checkpoint is in {j.out})")
        return
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    # spawn: a forked torch process can deadlock in its thread pool; workers start clean instead.
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, j.cfg, j.out, j.mode, threads): j for j in todo}
        log(f"--- {len(todo)} runs on {n_jobs} processes ({threads} torch thread(s) each); progress in RUN/console.log")
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                if f.exception() is None and f.result():  # interrupted: stop, the others stop at their next step
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise JobsInterrupted(f"{futures[f].name} was interrupted (its checkpoint is in {futures[f].out})")
                if f.exception() is not None:
                    # Runs already under way finish (and stay reusable); queued ones are dropped.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise RuntimeError(f"{futures[f].name} failed (its output: {futures[f].out / 'console.log'})") \
                        from f.exception()
                log(f"--- done: {futures[f].name} ({len(futures) - len(pending)}/{len(futures)})")


def _run_one(cfg: Config, out: Path, mode: str, threads: int) -> bool:
    """Runs one job in a worker process; True if it was interrupted."""
    import torch

    from opd.loop import run

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "console.log", "a", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        return run(cfg, out, log=print, mode=mode, resume=(out / "checkpoints").is_dir()).interrupted
