"""engine = "ray": rollout workers and teacher workers as Ray actors.

The trainer stays in the driver process. Each batch is split over the rollout workers (each samples its
share with the weights it was last sent, seeded by (seed, step, share) so a re-issued call gives the same
tokens) and then over the teacher workers. After every update the driver puts the new weights in Ray's
object store once and every rollout worker loads them, with their version: each sampled row carries it.

Failures: actors are created with `max_restarts` and no automatic task retries, so a worker that dies
(SIGKILL, OOM) fails its call in flight with RayActorError; Ray restarts it (its __init__ runs again) and
opd re-sends the current weights and re-issues the call. Only the answer that arrives is used, so no
rollout or score is counted twice. Local Ray runs with no dashboard, in a session folder that is removed at the
end (Ray resolves 127.0.0.1 to the machine's address for its own processes).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

import opd
from opd.config import Config, ConfigError, RayConfig, validate_config
from opd.faults import RunAborted
from opd.types import Prompt, Rollout, TeacherScores

try:
    from ray.exceptions import ActorUnavailableError  # a RayActorError: the actor is restarting
except ImportError:  # older Ray

    class ActorUnavailableError(RayActorError):
        pass

FORWARDED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "HF_HOME", "OPD_CACHE_DIR",
                 "OPD_WORKER_CRASH_AT", "OPD_WORKER_CRASH_ONCE")


# ------------------------------------------------------------------------------------------- actors
class RolloutWorker:
    """Holds a copy of the student; samples a share of a batch with the last weights it was sent."""

    def __init__(self, cfg_data: dict):
        from opd.models import load_student, load_tokenizer, load_model, resolve_device
        from opd.rollout import SamplingParams, make_guide, sampling_copy_for

        cfg = validate_config(cfg_data)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.student.model)
        self.model = load_student(cfg.student, cfg.seed)  # the architecture; the weights arrive with load_weights
        self.device = resolve_device(cfg.student.device)
        guided = cfg.rollout.teacher_mix > 0 or cfg.rollout.teacher_correct_topk > 0
        teacher_model = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device) if guided else None
        self.guide = make_guide(cfg.rollout.teacher_mix, cfg.rollout.teacher_correct_topk, teacher_model,
                                self.tokenizer, cfg.teacher.model)
        dtype = cfg.rollout.dtype
        self.params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens,
                                     cfg.rollout.stop, cfg.rollout.decoder, int8=dtype == "int8")
        # rollout.dtype as in the local loop: a bf16/fp16 copy samples, refreshed whenever new weights arrive (int8:
        # int8 decode steps, prefilled by a bf16 copy or, on CPUs without bf16 instructions, the model itself)
        self.copy = sampling_copy_for(self.model, dtype)
        self.sampler = self.model
        self.version = -1  # no weights yet

    def load_weights(self, state: dict, version: int) -> int:
        self.model.load_state_dict(state)
        self.sampler = self.model if self.copy is None else self.copy.refresh(self.model)
        self.version = version
        return version

    def rollout(self, prompts: list[Prompt], step: int, seed: int, state: dict | None = None,
                version: int | None = None, latest: tuple | None = None) -> Rollout:
        """`state`/`version`: weights to load first (a re-issued call to a restarted, blank worker). `latest`:
        ([weights or their object ref], version), loaded only by a worker that has none: one that died while idle
        was restarted blank by Ray, and no failed call told the trainer so. In a list, the ref is not fetched by
        the workers that do not need it."""
        from opd.faults import worker_crash_point
        from opd.rollout import sample

        if state is None and self.version < 0 and latest is not None:
            state, version = latest[0][0], latest[1]
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
        if state is not None:
            self.load_weights(state, version)
        assert self.version >= 0, "a rollout worker sampled before it was sent weights"
        worker_crash_point("rollout", step)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return sample(self.sampler, self.tokenizer, prompts, self.params, policy_version=self.version,
                      generator=generator, max_prompt_tokens=self.cfg.prompts.max_prompt_tokens, guide=self.guide)

    def pid(self) -> int:
        return os.getpid()


class TeacherWorker:
    """Holds the teacher; scores a share of a batch."""

    def __init__(self, cfg_data: dict):
        from opd.loop import make_teacher
        from opd.models import load_model, load_tokenizer

        cfg = validate_config(cfg_data)
        model = load_model(cfg.teacher.model, dtype=cfg.teacher.dtype, device=cfg.teacher.device)
        self.teacher = make_teacher(cfg, model, load_tokenizer(cfg.student.model), load_tokenizer(cfg.teacher.model),
                                    "onpolicy")

    def score(self, rollout: Rollout, full: bool, step: int) -> TeacherScores:
        from opd.faults import worker_crash_point

        worker_crash_point("teacher", step)
        return self.teacher.score(rollout, full=full)

    def pid(self) -> int:
        return os.getpid()


# ------------------------------------------------------------------------------------------- driver
class RaySession:
    """A local Ray cluster (or a connection to `address`); close() shuts it down and removes
    the session folder of a cluster it started."""

    def __init__(self, rc: RayConfig):
        self.owned = not ray.is_initialized()
        self.temp_dir = None
        if not self.owned:
            return
        src = str(Path(opd.__file__).resolve().parent.parent)  # workers import this very opd
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        common = dict(include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
                      logging_level="warning")
        # ray.init installs its own SIGTERM handler (exit at once): the run's, which stops after the step under way
        # and writes a checkpoint, is put back
        term = signal.getsignal(signal.SIGTERM)
        try:
            if rc.address:
                ray.init(address=rc.address, **common)
            else:
                self.temp_dir = tempfile.mkdtemp(prefix="opd-ray-", dir="/tmp")  # short: Ray's socket paths must fit
                ray.init(_node_ip_address="127.0.0.1", num_cpus=rc.num_cpus,
                         object_store_memory=rc.object_store_mb * 2**20, _temp_dir=self.temp_dir, **common)
        finally:
            if term is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, term)

    def close(self) -> None:
        if self.owned:
            ray.shutdown()
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayWorkers:
    """The Ray engine as the pipeline sees it: a RolloutBackend (load_weights / rollout) plus score()."""

    def __init__(self, cfg: Config, *, version: int, weights: dict[str, torch.Tensor], log=print,
                 teacher_actors: bool = True):
        self.cfg, self.log = cfg, log
        self.closed = False
        self.session = RaySession(cfg.ray)
        try:
            check_resources(cfg.ray, cfg.ray.rollout_workers + (cfg.ray.teacher_workers if teacher_actors else 0))
            data = cfg.model_dump(mode="json")
            opts = dict(num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker,
                        max_restarts=cfg.ray.max_restarts, max_task_retries=0)
            self.rollout_workers = [ray.remote(RolloutWorker).options(**opts).remote(data)
                                    for _ in range(cfg.ray.rollout_workers)]
            # no teacher actors when the trainer scores through a teacher server (or named teachers) itself
            self.teacher_workers = [ray.remote(TeacherWorker).options(**opts).remote(data)
                                    for _ in range(cfg.ray.teacher_workers if teacher_actors else 0)]
            self.retries, self._step = 0, 0
            from opd.models import load_tokenizer

            self.pad_id = load_tokenizer(cfg.student.model).pad_token_id
            self.load_weights(weights, version)
        except BaseException:
            self.session.close()
            raise

    # ---- RolloutBackend
    def load_weights(self, state: dict[str, torch.Tensor] | None, version: int) -> None:
        self._weights = ray.put(state)  # once in the object store, read by every worker
        self.version = version
        self._gather([(w, "load_weights", (self._weights, version)) for w in self.rollout_workers])

    def rollout(self, prompts: list[Prompt], step: int) -> Rollout:
        from opd.loop import concat_rollouts

        self._step = step  # the step score() is called for next (fault injection only)
        shares = [s for s in np.array_split(np.arange(len(prompts)), len(self.rollout_workers)) if len(s)]
        latest = ([self._weights], self.version)
        calls = [(w, "rollout", ([prompts[i] for i in idx], step, self._seed(step, k), None, None, latest))
                 for k, (w, idx) in enumerate(zip(self.rollout_workers, shares))]
        return concat_rollouts(self._gather(calls), self.pad_id)

    def rng_state(self) -> None:
        return None  # sampling is seeded per (step, share): nothing to checkpoint

    # ---- scoring
    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        shares = [s for s in np.array_split(np.arange(len(rollout.texts)), len(self.teacher_workers)) if len(s)]
        calls = [(w, "score", (rollout.select(idx.tolist()), full, self._step)) for w, idx in zip(self.teacher_workers, shares)]
        return concat_scores(self._gather(calls))

    def counters(self) -> dict[str, float]:
        return {"engine/worker_retries": float(self.retries)}

    def close(self) -> None:
        self.closed = True  # a call still in flight fails now: not a worker to restart and re-issue to
        for w in getattr(self, "rollout_workers", []) + getattr(self, "teacher_workers", []):
            ray.kill(w, no_restart=True)
        self.session.close()

    # ---- internals
    def _seed(self, step: int, share: int) -> int:
        return int(np.random.default_rng([self.cfg.seed, 0x5A3B, step, share]).integers(2**62))

    def _gather(self, calls: list[tuple]) -> list:
        """Run the calls in parallel and return their answers in order (a failed call is re-issued)."""
        refs = [getattr(w, method).remote(*args) for w, method, args in calls]
        return [self._get(ref, *call) for ref, call in zip(refs, calls)]

    def _get(self, ref, worker, method: str, args: tuple, restart_timeout_s: float = 300.0):
        """The call's answer. Its worker died (RayActorError): Ray restarts it, blank, so it is sent the current
        weights and the call is re-issued, for at most max_restarts deaths; while it restarts
        (ActorUnavailableError) the call is re-issued until it is back."""
        deaths, deadline = 0, None
        while True:
            try:
                return ray.get(ref)
            except RayActorError as e:
                if self.closed:
                    raise
                if not isinstance(e, ActorUnavailableError):
                    deaths += 1
                    if deaths > self.cfg.ray.max_restarts:
                        raise RunAborted(f"a Ray worker died during {method} and ray.max_restarts = "
                                         f"{self.cfg.ray.max_restarts} restarts are spent ({type(e).__name__}): continue "
                                         "with --resume from the run's last checkpoint (check the worker's memory, "
                                         "or raise ray.max_restarts)") from e
                if deadline is None:  # the first failure of this call
                    self.retries += 1
                    self.log(f"ray: a worker failed during {method} ({type(e).__name__}); re-issuing the call")
                    deadline = time.monotonic() + restart_timeout_s
                if time.monotonic() > deadline:
                    raise RunAborted(f"a Ray worker failed during {method} and was not back within "
                                     f"{restart_timeout_s:.0f} s; continue with --resume") from e
            time.sleep(0.5)
            if method == "rollout":  # a restarted worker starts blank: the call brings the current weights along
                args = (*args[:3], self._weights, self.version)
            ref = getattr(worker, method).remote(*args)


def check_resources(rc: RayConfig, actors: int) -> None:
    """Actors the cluster can never place wait forever, deaf to Ctrl-C: refused up front."""
    have = ray.cluster_resources()
    for kind, each, key in (("CPU", rc.cpus_per_worker, "cpus_per_worker"), ("GPU", rc.gpus_per_worker, "gpus_per_worker")):
        if each and actors * each > have.get(kind, 0):
            raise ConfigError(f"{actors} Ray actors x ray.{key} = {each} need {actors * each:g} {kind}s, and the Ray "
                              f"cluster has {have.get(kind, 0):g} (ray.num_cpus for the local one): lower "
                              f"ray.rollout_workers / ray.teacher_workers or ray.{key}, or raise ray.num_cpus")


def concat_scores(parts: list[TeacherScores]) -> TeacherScores:
    """Join the scores of consecutive shares of one rollout (same completion width)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    coverage, coverage_bytes = None, None
    if all(p.coverage_bytes is not None for p in parts):  # a fraction of the text: the shares' bytes add up
        coverage_bytes = (sum(p.coverage_bytes[0] for p in parts), sum(p.coverage_bytes[1] for p in parts))
        coverage = coverage_bytes[0] / coverage_bytes[1] if coverage_bytes[1] else 1.0
    return TeacherScores(
        token_logprobs=cat("token_logprobs"), scored_mask=cat("scored_mask"), topk_ids=cat("topk_ids"),
        topk_logprobs=cat("topk_logprobs"), full_logprobs=cat("full_logprobs"), entropy=cat("entropy"),
        rewards=cat("rewards"), advantages=cat("advantages"), coverage=coverage, coverage_bytes=coverage_bytes,
        latency_s=max(p.latency_s for p in parts), failures=sum(p.failures for p in parts),
        tokens_scored=sum(p.tokens_scored for p in parts), metrics=parts[0].metrics,
    )
