"""Evaluation on held-out prompts: fresh student samples, scored by the teacher and the verifier.

eval/reverse_kl is the per-token Monte-Carlo estimate of KL(pi_theta || pi_T) on the student's
own samples: mean over sampled tokens of log pi_theta(a_t|s_t) - log pi_T(a_t|s_t), both at the
eval temperature. Its expectation is the sequence-level reverse KL divided by the mean length.

With RecoverySettings, both also measure recovery from a broken prefix (opd.recovery):
eval/recovery_rate and friends.
"""

from __future__ import annotations

import numpy as np
import torch

from opd.prompts import verify
from opd.recovery import RecoverySettings, recovery_eval
from opd.rollout import SamplingParams, sample
from opd.types import Prompt


def eval_sampling(cfg) -> SamplingParams:
    """How every evaluation samples (in a run, `opd eval`, `opd compare`'s report): eval.temperature, no top-p, the
    run's stop strings and decoder."""
    return SamplingParams(cfg.eval.temperature, 1.0, cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                          cfg.rollout.stop, cfg.rollout.decoder)


def generate(model, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int, batch_size: int = 64,
             version: int = 0, max_prompt_tokens: int = 256):
    """Sample completions for many prompts in batches, with a generator of its own (training RNG untouched)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return [
        sample(model, tokenizer, prompts[i : i + batch_size], params, policy_version=version, generator=gen,
               max_prompt_tokens=max_prompt_tokens)
        for i in range(0, len(prompts), batch_size)
    ]


def accuracy(rollouts) -> float | None:
    checks = [verify(p, c) for r in rollouts for p, c in zip(r.prompts, r.texts)]
    checks = [c for c in checks if c is not None]
    return float(np.mean(checks)) if checks else None


def eval_seed(seed: int, step: int) -> int:
    """The sampling seed of a run's evaluation at `step` (`opd eval` of that step's weights draws the same)."""
    return int(np.random.default_rng([seed, 0xE7A1, step]).integers(2**31))


def evaluate(student, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int,
             version: int = 0, max_prompt_tokens: int = 256, recovery: RecoverySettings | None = None,
             teacher_model=None) -> dict[str, float]:
    rollouts = generate(student, tokenizer, prompts, params, seed=seed, batch_size=teacher.batch_size,
                        version=version, max_prompt_tokens=max_prompt_tokens)
    diff, t_lp, lengths = [], [], []
    for r in rollouts:
        s = teacher.score(r)
        m = (r.completion_mask * s.scored_mask).bool()
        diff.append((r.policy_logprobs - s.token_logprobs)[m])  # the student's own logprob (top-p: untruncated)
        t_lp.append(s.token_logprobs[m])
        lengths.append(r.completion_mask.sum(1).float())
    out = {"eval/length": float(torch.cat(lengths).mean())}
    if sum(len(d) for d in diff):  # left out when the teacher scored nothing (a server down), not written as NaN
        out["eval/reverse_kl"] = float(torch.cat(diff).mean())
        out["eval/teacher_nll"] = float(-torch.cat(t_lp).mean())
    acc = accuracy(rollouts)
    if acc is not None:
        out["eval/accuracy"] = acc
    if recovery is not None and recovery.size > 0:
        rec = recovery_eval(student, teacher, tokenizer, prompts, params, recovery, seed=seed,
                            max_prompt_tokens=max_prompt_tokens, teacher_model=teacher_model)
        out.update({k: v for k, v in rec.items() if k.startswith("eval/")})  # scalars only in a metrics row
    return out


# ------------------------------------------------------------------ detailed evaluation (`opd eval`)
def _bins(values, width: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for key, v in values:
        out.setdefault(int(key) // width * width, []).append(v)
    return dict(sorted(out.items()))


@torch.no_grad()
def teacher_forced_step_errors(model, tokenizer, prompts: list[Prompt], temperature: float) -> list[list[float]]:
    """Per segment of the reference answer (each step, then the final answer): the probability that sampling at
    `temperature` misses a token of it when the model is fed the *correct* prefix (an oracle prefix, so no error can
    accumulate): 1 - prod_t p(y_t | correct prefix). The free-running side samples from that same distribution, so
    at the first step, where both see the same prefix, the two agree in expectation."""
    from opd.logprobs import completion_hidden, lm_logits
    from opd.prompts.tasks import get_task
    from opd.teacher.builtin import reference_batch

    task = get_task(prompts[0].task)
    batch = reference_batch(tokenizer, prompts, task.solution)
    hidden = completion_hidden(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    mask = batch.completion_mask.bool()
    logp = torch.log_softmax(lm_logits(model, hidden, 1.0).float() / temperature, -1)
    right = torch.zeros(batch.completion_ids.shape, dtype=torch.float64)
    right[mask] = logp.gather(-1, batch.completion_ids[mask][:, None].to(logp.device))[:, 0].double().cpu()
    out = []
    for i, p in enumerate(prompts):
        errs, pos = [], 0
        for seg in task.segments(task.solution(p.text)):
            errs.append(1.0 - float(right[i, pos : pos + len(seg)].sum().exp()))
            pos += len(seg) + 1  # the separator
        out.append(errs)
    return out


def detailed_eval(student, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int,
                  max_prompt_tokens: int = 256, length_bin: int = 16, position_bin: int = 8,
                  recovery: RecoverySettings | None = None) -> dict:
    """Scalars of `evaluate` plus accuracy by output length, teacher NLL by token position, and for
    built-in tasks the exposure-bias picture: per-step error rate on the student's own prefixes
    (free-running) vs on correct prefixes (teacher-forced); their difference is the error that
    accumulated because the student conditioned on its own earlier mistakes (cf. Arora et al.'s ExAccErr)."""
    from opd.prompts.tasks import TASKS

    rollouts = generate(student, tokenizer, prompts, params, seed=seed, batch_size=teacher.batch_size,
                        max_prompt_tokens=max_prompt_tokens)
    diff, nll_pos, acc_len = [], [], []
    for r in rollouts:
        s = teacher.score(r)
        m = (r.completion_mask * s.scored_mask).bool()
        diff.append((r.policy_logprobs - s.token_logprobs)[m])
        for i in range(len(r.texts)):
            n = int(r.completion_mask[i].sum())
            # scored tokens only: an unscored one (a dropped sequence, a cross-tokenizer hole) holds 0, not an NLL
            nll_pos += [(t, -float(s.token_logprobs[i, t])) for t in range(n) if m[i, t]]
            ok = verify(r.prompts[i], r.texts[i])
            if ok is not None:
                acc_len.append((n, float(ok)))
    out: dict = {
        "eval/length": float(np.mean([int(r.completion_mask.sum(1)[i]) for r in rollouts for i in range(len(r.texts))])),
        "teacher_nll_by_position": {k: float(np.mean(v)) for k, v in _bins(nll_pos, position_bin).items()},
    }
    if nll_pos:  # left out when the teacher scored nothing (a server down), not written as NaN
        out["eval/reverse_kl"] = float(torch.cat(diff).mean())
        out["eval/teacher_nll"] = float(np.mean([v for _, v in nll_pos]))
    acc = accuracy(rollouts)
    if acc is not None:
        out["eval/accuracy"] = acc
        out["accuracy_by_length"] = {k: float(np.mean(v)) for k, v in _bins(acc_len, length_bin).items()}
    arith = [p for p in prompts if p.task in TASKS]
    if arith and len({p.task for p in arith}) == 1:
        texts = {p.text: c for r in rollouts for p, c in zip(r.prompts, r.texts)}
        task = TASKS[arith[0].task]
        free = [task.step_errors(p, texts[p.text]) for p in arith]
        forced = teacher_forced_step_errors(student, tokenizer, arith, params.temperature)
        width = max(len(e) for e in free)
        free_rate = [float(np.mean([e[i] for e in free if i < len(e)])) for i in range(width)]
        forced_rate = [float(np.mean([e[i] for e in forced if i < len(e)])) for i in range(width)]
        out["error_by_step"] = {"free_running": free_rate, "teacher_forced": forced_rate,
                                "excess": [a - b for a, b in zip(free_rate, forced_rate)]}
        out["eval/excess_error"] = float(np.mean(out["error_by_step"]["excess"]))
    if recovery is not None and recovery.size > 0:
        out.update(recovery_eval(student, teacher, tokenizer, prompts, params, recovery, seed=seed,
                                 max_prompt_tokens=max_prompt_tokens))
    return out
