"""Data-parallel training through torch.distributed (gloo on CPU, NCCL on GPU).

Every rank holds the same weights and one share of each batch. The update normalises the loss by the
global token count (an all-reduced sum) and sums gradients over ranks, so one step equals a step of a
single process on the combined batch. Launch with `torchrun --nproc-per-node N -m opd.cli run ...`
(or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, e.g. Ray Train).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    rank: int
    world: int
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)

    @classmethod
    def from_env(cls, device: torch.device | str = "cpu") -> "DataParallel | None":
        """The process group torchrun describes in the environment; None for a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        device = torch.device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n (equal shares, so every rank runs the same mini-batches)."""
        if n % self.world:
            raise ValueError(f"a batch of {n} rows does not split evenly over {self.world} ranks")
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def sum(self, x: float) -> float:
        return self.sums([x])[0]

    def sums(self, xs: list[float]) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum gradients over ranks in one flat bucket (a parameter without a gradient counts as zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(device=p.device, dtype=p.dtype)
            offset += n

    def broadcast_params(self, model: torch.nn.Module) -> None:
        """Start every rank from rank 0's weights."""
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.data.to(self.device)
            dist.broadcast(buf, src=0)
            t.data.copy_(buf)

    def gathered(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order, on every rank."""
        every: list = [None] * self.world
        dist.all_gather_object(every, obj)
        return every

    def merged_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """One step's metrics of the whole global batch (merge_rank_metrics of every rank's), on every rank."""
        return merge_rank_metrics(self.gathered(metrics))  # objects: the ranks' key sets may differ (e.g. accuracy)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


# Counts and throughputs add up over ranks (they run side by side); the slowest rank bounds a step's time and the
# largest value is the maximum and the smallest the minimum; a mean over tokens is weighted by each rank's completion
# tokens (ranks' completions differ in length); everything else (per-row means of equal shares, losses and grad norms
# that every rank already shares) is the mean over the ranks that report it.
# Cumulative run counters (teacher/*_total, engine/worker_retries) are summed over the ranks' clients by
# run_counters, every rank taking part, and saved as that sum with rank 0's checkpoint.
SUMMED = ("rollout/tokens", "rollout/tokens_per_s", "feedback/tokens_dropped", "reward/teacher_rows",
          "teacher/broken_rows")
# a mean over some rows of each rank's: weighted by how many each rank had
ROW_MEANS = {"teacher/break_pos_mean": "teacher/broken_rows"}
TOKEN_MEANS = ("opd/reverse_kl", "opd/advantage_mean", "opd/advantage_pos_frac", "teacher/logprob_mean",
               "teacher/entropy", "student/logprob_mean", "stability/entropy", "stability/clip_frac", "stability/kl_ref",
               "freshness/ratio_mean", "freshness/policy_lag", "freshness/logprob_drift", "update/new_logprob_mean",
               "update/distribution_loss", "feedback/loss_weight_mean", "feedback/clip_frac",
               "rollout/teacher_token_frac", "teacher/coverage")
# The teacher's counts, summed too: teacher/<count>, one named teacher's teacher/NAME/<count> ([teachers.NAME]), and
# failures by kind (teacher/failures/http, teacher/NAME/failures/http).
TEACHER_COUNTS = ("tokens", "tokens_per_s", "failures", "dropped", "retries", "requests", "breaker_rejections",
                  "cache_hits")


def _merge_rule(key: str) -> str:
    if key in SUMMED or (key.startswith("teacher/") and (key.rsplit("/", 1)[-1] in TEACHER_COUNTS or "/failures/" in key)):
        return "sum"
    if key.startswith("time/") or key.endswith("_max") or "_p99" in key:
        return "max"
    if key.endswith("_min"):
        return "min"
    return "token_mean" if key in TOKEN_MEANS else "mean"


def merge_rank_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Merge one step's metrics from every rank into the whole batch's (see _merge_rule)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for r in rows for k in r):  # first-seen order
        values = [r[key] for r in rows if key in r]
        rule = _merge_rule(key)
        weights = [r.get(ROW_MEANS.get(key, "rollout/tokens"), 0) for r in rows if key in r]
        if (rule == "token_mean" or key in ROW_MEANS) and sum(weights) > 0:
            out[key] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
            continue
        if not all(isinstance(v, (int, float)) for v in values):
            out[key] = values[0]
        elif rule == "sum":
            out[key] = sum(values)
        elif rule == "max":
            out[key] = max(values)
        elif rule == "min":
            out[key] = min(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def run_counters(before: dict[str, float], per_rank_now: list[dict[str, float]]) -> dict[str, float]:
    """Cumulative counters of a whole run: those saved up to the checkpoint it resumed from (already summed over
    the ranks of that run), plus what every rank's clients have counted since."""
    keys = sorted(before.keys() | {k for now in per_rank_now for k in now})
    return {k: before.get(k, 0.0) + sum(now.get(k, 0.0) for now in per_rank_now) for k in keys}
