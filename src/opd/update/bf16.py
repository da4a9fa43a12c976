"""train.bf16_weights: the update's forward and backward on bf16 weights, with fp32 master weights in the optimizer.

Under autocast (train.autocast = "bfloat16") every forward casts each fp32 weight to bf16 and every backward casts
each weight's gradient back to fp32; the gradient clip then reads and scales the fp32 gradients, AdamW makes its
pass, and the rollout's bf16 copy is refreshed from the new weights: six passes over every parameter a step beyond
the matmuls (~190 ms of a ~1.7 s step for the 81M half-depth SmolLM2 student on a 2-core Xeon, bench/NOTES.md
session 13). Here:

- the student itself stays fp32 and is the master: checkpoints, resume, evaluation and the optimizer's state are
  those of an fp32 run (a run may resume with or without this setting);
- a bf16 copy of it runs the forward and backward, so its weights need no cast and its gradients arrive in bf16.
  Where the rollout samples from a bf16 copy in this process (rollout.dtype = "bfloat16" / "int8", no pipelining),
  it is that same copy: the weights the student samples with are the weights it trains;
- the gradient's norm is read from the bf16 gradients, and the clip is not a pass of its own: its coefficient goes
  to the optimizer, which in one pass per parameter scales the gradient, steps AdamW on the fp32 weights and
  moments, and writes the bf16 copy (csrc/adamw.c; torch's ops where that kernel is unavailable) and, where the
  rollout decodes with int8 weights made from that copy (rollout.dtype = "int8"), their rows and scales too: the
  next rollout finds them current instead of requantising every weight (opd.llama.int8_rows / int8_written).

The numerics differ from autocast's in one place: activations between layers (the residual stream) are bf16, as in
any bf16-weights training, where autocast keeps them fp32.
"""

from __future__ import annotations

import math

import torch

from opd import cpu_kernels, llama
from opd.rollout.sampler import SamplingCopy


class Bf16Weights:
    """The bf16 copy the update trains through. `model()` is that copy, in step with the student."""

    def __init__(self, student, copy: SamplingCopy | None = None):
        if next(student.parameters()).dtype != torch.float32:
            raise ValueError("train.bf16_weights keeps fp32 master weights in the student: load it as float32 "
                             "(student.dtype = 'float32')")
        self.student = student
        self.copy = copy if copy is not None and copy.dtype == torch.bfloat16 else SamplingCopy(student, torch.bfloat16)
        for s, c in zip(student.parameters(), self.copy.model.parameters(), strict=True):
            c.requires_grad_(s.requires_grad)

    def model(self):
        return self.copy.refresh(self.student)

    def optimizer(self, *, lr: float, betas: tuple[float, float], weight_decay: float) -> "MasterAdamW":
        pairs = [(s, c) for s, c in zip(self.student.parameters(), self.copy.model.parameters(), strict=True)
                 if s.requires_grad]
        return MasterAdamW([s for s, _ in pairs], [c for _, c in pairs], self, lr=lr, betas=betas,
                           weight_decay=weight_decay)


class MasterAdamW(torch.optim.AdamW):
    """AdamW over the student's fp32 parameters whose gradients arrive on the bf16 copy's parameters; each step
    also writes the copy. Its state_dict is torch's AdamW's over the student's parameters, so a checkpoint loads
    into either optimizer. `grad_mul` scales the next step's gradients (the clip's coefficient, set by
    opd.update.step.clip_gradients)."""

    def __init__(self, params: list[torch.Tensor], copies: list[torch.Tensor], weights: Bf16Weights, **kwargs):
        super().__init__(params, **kwargs)
        self.copy_of = {id(p): c for p, c in zip(params, copies, strict=True)}  # where each one's gradient arrives
        self.weights = weights
        self.grad_mul = 1.0

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for c in self.copy_of.values():  # where the gradients are
            c.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        fast = cpu_kernels.adamw_available()
        # Where the copy's int8 decode weights are current, the kernel rewrites their rows in the same pass as the
        # copy's (no requantising pass before the next rollout); they are current after the step only if every
        # weight they hold was written that way or not at all.
        copies = [self.copy_of[id(p)] for g in self.param_groups for p in g["params"]]
        rows = llama.int8_rows(self.weights.copy.model, copies) if fast else None
        int8_of = {} if rows is None else {id(c): r for c, r in zip(copies, rows) if r is not None}
        int8_current = rows is not None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                c = self.copy_of[id(p)]
                if c.grad is None:
                    continue
                state = self.state[p]
                if not state:  # torch AdamW's state layout (fused: the step on the parameter's device)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, step = state["exp_avg"], state["exp_avg_sq"], float(state["step"])
                grad = c.grad.to_dense() if c.grad.is_sparse else c.grad
                if fast and all(t.device.type == "cpu" and t.is_contiguous() for t in (p, grad, m, v, c)):
                    cpu_kernels.adamw_step(p, grad, m, v, c, grad_mul=self.grad_mul, lr=group["lr"], beta1=beta1,
                                           beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                                           int8=int8_of.get(id(c)))
                else:
                    int8_current = int8_current and id(c) not in int8_of
                    g = grad.to(p.dtype) * self.grad_mul
                    torch._fused_adamw_([p], [g], [m], [v], [], [state["step"]], lr=group["lr"], beta1=beta1,
                                        beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                        amsgrad=False, maximize=False)
                    c.copy_(p)
        self.grad_mul = 1.0
        # the C kernel wrote through raw pointers: mark both sides written, so that caches keyed on version
        # counters (opd.llama's fused and int8 decode weights) rebuild, then record that the copy matches
        torch.autograd.graph.increment_version([p for g in self.param_groups for p in g["params"]]
                                               + list(self.copy_of.values()))
        self.weights.copy.written_from(self.weights.student)
        if int8_current:
            llama.int8_written(self.weights.copy.model)

    marks_versions = True  # opd.update.step.step_optimizer: the version counters are already moved (above)


def grad_norm(params: list[torch.Tensor]) -> float:
    """The global L2 norm of the parameters' gradients (bf16 or fp32), read in one pass (torch's ops, an fp64 sum,
    where the C pass does not apply)."""
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    return math.sqrt(cpu_kernels.sum_squares_all(grads))
