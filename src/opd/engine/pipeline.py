"""Where the trainer's batches come from: made on demand, or by a producer running ahead of it.

A batch for step s is: prompts -> a rollout backend samples them -> the teacher scores them. The
trainer takes batch s, trains on it and publishes the new weights (version-tagged). Two sources:

- `SyncBatches` (max_policy_lag = 0): batch s is made when the trainer asks, with the current weights,
  exactly as the plain loop does. Nothing overlaps, no token is ever stale.
- `PipelinedBatches`: a producer thread makes batches `ahead` steps in front of the trainer, so
  rollout and teacher scoring of step s+1 overlap the update of step s. Bounded staleness: batch s is
  sampled with the weights published after step s - 1 - ahead (never older, and never newer, so a run
  is reproducible whatever the timing). With `ahead = max_policy_lag // updates_per_batch`, a batch is
  at most max_policy_lag versions old when its first update starts.

The rollout backend is the seam for other samplers (Ray actors, an inference server): anything with
`load_weights(state, version)` and `rollout(prompts, step) -> Rollout` whose rows carry the version of
the weights that sampled them.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from opd.types import Prompt, Rollout, TeacherScores


@dataclass
class ScoredBatch:
    """One step's training data, with what it cost to make."""

    step: int
    rollout: Rollout
    scores: TeacherScores
    rollout_s: float = 0.0
    teacher_s: float = 0.0


class RolloutBackend(Protocol):
    """Samples completions with the weights it was last given; every row is tagged with their version."""

    version: int

    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        """New weights (None: the backend shares the trainer's model, only the version moves)."""

    def rollout(self, prompts: list[Prompt], step: int) -> Rollout: ...

    def rng_state(self) -> torch.Tensor | None:
        """Sampler state to checkpoint (None when sampling is seeded per step); the loop restores its generator."""


# produce(step, backend) -> ScoredBatch: prompts for the step, the backend's rollout, the teacher's scores.
Produce = Callable[[int, RolloutBackend], ScoredBatch]


class SyncBatches:
    """Batch s made on demand with the current weights: today's strictly on-policy loop."""

    ahead = 0

    def __init__(self, produce: Produce, backend: RolloutBackend, prompt_state: Callable[[], dict]):
        self.produce, self.backend, self.prompt_state = produce, backend, prompt_state

    def get(self, step: int) -> ScoredBatch:
        return self.produce(step, self.backend)

    def publish(self, step: int, version: int, weights: Callable[[], dict | None]) -> None:
        self.backend.load_weights(weights(), version)

    def state_dict(self, step: int) -> dict:
        return {"sampler": self.backend.rng_state(), "prompts": self.prompt_state(), "pending": []}

    def close(self) -> None:
        pass


class PipelinedBatches:
    """A producer thread `ahead` steps in front of the trainer (see the module docstring for the bound)."""

    def __init__(self, produce: Produce, backend: RolloutBackend, prompt_state: Callable[[], dict], *, start: int,
                 max_steps: int, ahead: int, pending: list[ScoredBatch] = ()):
        assert ahead >= 1
        self.produce, self.backend, self.prompt_state = produce, backend, prompt_state
        self.start, self.max_steps, self.ahead = start, max_steps, ahead
        self._ready: dict[int, ScoredBatch] = {b.step: b for b in pending}
        self._after: dict[int, dict] = {}  # sampler + prompt state right after batch s was made (for checkpoints)
        self._weights: queue.Queue = queue.Queue()  # (step, version, state) published by the trainer, in order
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        first = start + 1 + len(self._ready)
        if self._ready:  # resumed: the state after the last pending batch is the one just restored
            self._after[first - 1] = self._snapshot()
        self._thread = threading.Thread(target=self._run, args=(first,), name="opd-producer", daemon=True)
        self._thread.start()

    # ---- producer side
    def _run(self, first: int) -> None:
        try:
            for s in range(first, self.max_steps + 1):
                needed = s - 1 - self.ahead  # batch s is sampled with the weights published after this step
                if needed > self.start:
                    item = self._weights.get()
                    if item is None:
                        return
                    published, version, state = item
                    assert published == needed, (published, needed)
                    self.backend.load_weights(state, version)
                if self._closed:
                    return
                batch = self.produce(s, self.backend)
                with self._cond:
                    self._ready[s] = batch
                    self._after[s] = self._snapshot()
                    self._cond.notify_all()
        except BaseException as e:  # handed to the trainer, which raises it
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _snapshot(self) -> dict:
        return {"sampler": self.backend.rng_state(), "prompts": self.prompt_state()}

    # ---- trainer side
    def _wait_for(self, step: int) -> None:
        with self._cond:
            while step not in self._ready and self._error is None:
                self._cond.wait(timeout=1.0)
            if self._error is not None and step not in self._ready:
                raise self._error

    def get(self, step: int) -> ScoredBatch:
        self._wait_for(step)
        with self._cond:
            self._after = {s: v for s, v in self._after.items() if s >= step}
            return self._ready.pop(step)

    def publish(self, step: int, version: int, weights: Callable[[], dict | None]) -> None:
        if step + 1 + self.ahead <= self.max_steps:  # some later batch is sampled with these weights
            self._weights.put((step, version, weights()))

    def state_dict(self, step: int) -> dict:
        """The batches made ahead of `step` (already sampled with older weights: a resumed run trains on the same
        ones) and the sampler/prompt state right after the last of them."""
        last = min(step + self.ahead, self.max_steps)
        for s in range(step + 1, last + 1):
            self._wait_for(s)
        with self._cond:
            pending = [self._ready[s] for s in range(step + 1, last + 1)]
            after = self._after[last] if last > step else self._snapshot()
        return {**after, "pending": pending}

    def close(self) -> None:
        self._closed = True
        self._weights.put(None)
        self._thread.join(timeout=60)


def make_batches(produce: Produce, backend: RolloutBackend, prompt_state: Callable[[], dict], *, start: int,
                 max_steps: int, ahead: int, pending: list[ScoredBatch] = ()):
    if ahead == 0:
        assert not pending
        return SyncBatches(produce, backend, prompt_state)
    return PipelinedBatches(produce, backend, prompt_state, start=start, max_steps=max_steps, ahead=ahead,
                            pending=list(pending))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
