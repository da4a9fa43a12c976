"""Recovery evaluation: does the student get back on track after an error in its prefix?

On-policy distillation trains the student at the states its own mistakes lead to, so it should
recover from them more often than a student that only ever saw the teacher's clean text. Two
measurements, both on held-out prompts, with generators of their own (training RNG untouched):

Verified recovery (built-in tasks, `eval/recovery_rate`). The task plants an error in the prefix
of the reference answer (`task.plant_error`: one wrong digit in a written step's result, cut right
after that step). The student continues from prompt + prefix; it recovered if prefix + continuation
has a verified-correct final answer. `eval/recovery_clean_accuracy` is the same with the correct
digit, so the gap between the two is what the planted error cost. `recovery_by_step`: rate per
corrupted step.

Likelihood recovery (any task, `eval/recovery_rate_likelihood`). The teacher writes a completion;
at a uniformly drawn position j (before its EOS) we keep its first j tokens and append a forced
token f, drawn uniformly among the non-special tokens whose teacher logprob there is below
feedback.break_logprob (a token the break detector would flag on its own; a position where the
teacher finds every token plausible is skipped and counted in `eval/recovery_skipped`). The student continues
for at most H = eval.recovery_horizon tokens and the teacher scores them. It recovered if some
window of w = feedback.break_window consecutive continuation tokens (all of them, if the
continuation ended sooner) has mean teacher logprob >= feedback.break_logprob - that is, within H
tokens the text is no longer broken by the detector's own rule. `eval/recovery_tokens_mean`: the
continuation tokens it took (to the end of that first good window), over the recovered ones.
Where no task verifies recovery, `eval/recovery_rate` is this likelihood rate. It needs the teacher's
weights in this process (to write completions and find unlikely tokens); a teacher that only scores
(a server) skips it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from opd.feedback.broken import windowed_mean
from opd.prompts.tasks import TASKS
from opd.rollout import SamplingParams, encode_prompts
from opd.types import Prompt


@dataclass(frozen=True)
class RecoverySettings:
    size: int = 32  # held-out prompts used (0 = off)
    horizon: int = 16  # H: continuation tokens within which the likelihood must recover
    window: int = 4  # w: the break detector's window
    threshold: float = -3.0  # the break detector's threshold on the windowed mean teacher logprob

    @classmethod
    def from_config(cls, cfg) -> "RecoverySettings":
        return cls(size=cfg.eval.recovery_size, horizon=cfg.eval.recovery_horizon,
                   window=cfg.feedback.break_window, threshold=cfg.feedback.break_logprob)


def _continue(student, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int, batch_size: int,
              max_prompt_tokens: int):
    from opd.evaluate import generate  # evaluate imports this module

    return generate(student, tokenizer, prompts, params, seed=seed, batch_size=batch_size,
                    max_prompt_tokens=max_prompt_tokens)


def planted_error_recovery(student, tokenizer, prompts: list[Prompt], params: SamplingParams, *, seed: int,
                           batch_size: int = 64, max_prompt_tokens: int = 256) -> dict | None:
    """Verified recovery from a planted wrong digit (built-in tasks only; None when no prompt has such a task)."""
    cases = [p for p in prompts if p.task in TASKS]
    if not cases:
        return None
    rng = np.random.default_rng([seed, 0x9EC0])
    planted, clean, steps = [], [], []
    for p in cases:
        task = TASKS[p.task]
        prefix, step = task.plant_error(p.text, rng)
        planted.append(prefix)
        clean.append(task.solution(p.text)[: len(prefix)])  # the same cut with the right digit
        steps.append(step)
    out: dict = {}
    for name, prefixes in (("eval/recovery_rate", planted), ("eval/recovery_clean_accuracy", clean)):
        conts = [Prompt(text=p.text + pre, source=p.source, answer=p.answer, task=p.task)
                 for p, pre in zip(cases, prefixes)]
        rolls = _continue(student, tokenizer, conts, params, seed=seed, batch_size=batch_size,
                          max_prompt_tokens=max_prompt_tokens + params.max_new_tokens)  # room for the prefix
        texts = [t for r in rolls for t in r.texts]
        ok = [bool(TASKS[p.task].verify(p, pre + t)) for p, pre, t in zip(cases, prefixes, texts)]
        out[name] = float(np.mean(ok))
        if name == "eval/recovery_rate":
            by_step: dict[int, list[bool]] = {}
            for s, o in zip(steps, ok):
                by_step.setdefault(s, []).append(o)
            out["recovery_by_step"] = {s: float(np.mean(v)) for s, v in sorted(by_step.items())}
    return out


@torch.no_grad()
def _next_token_logprobs(model, tokenizer, texts: list[str], temperature: float, max_prompt_tokens: int) -> torch.Tensor:
    """The model's next-token logprobs after each text: [N, V]."""
    ids, mask = encode_prompts(tokenizer, [Prompt(text=t, source="") for t in texts], max_prompt_tokens)
    dev = next(model.parameters()).device
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1).cpu()


def recovered_within(token_logprobs: torch.Tensor, mask: torch.Tensor, window: int, threshold: float) -> torch.Tensor:
    """[B] continuation tokens up to the end of the first good window (mean teacher logprob >= threshold over
    `window` consecutive tokens, or over all of them when the continuation is shorter); 0 = never recovered."""
    wm = windowed_mean(token_logprobs, mask, window)
    n = mask.sum(1, keepdim=True)
    t = torch.arange(mask.shape[1])[None, :]
    full = (t >= window - 1) | (t == n - 1)  # a whole window, or the whole (short) continuation
    good = mask.bool() & full & (wm >= threshold)
    first = torch.argmax(good.int(), dim=1) + 1
    return torch.where(good.any(1), first, torch.zeros_like(first))


def likelihood_recovery(student, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams,
                        settings: RecoverySettings, *, seed: int, max_prompt_tokens: int = 256,
                        teacher_model=None) -> dict:
    """Return to high teacher likelihood after a forced unlikely token (any task). `teacher` scores the
    continuations; `teacher_model` (default: teacher.model) writes the completions and finds unlikely tokens."""
    from opd.evaluate import generate

    teacher_model = teacher.model if teacher_model is None else teacher_model
    batch_size = getattr(teacher, "batch_size", 64)
    rng = np.random.default_rng([seed, 0x11CE])
    refs = generate(teacher_model, tokenizer, prompts, params, seed=seed + 1, batch_size=batch_size,
                    max_prompt_tokens=max_prompt_tokens)
    special = set(tokenizer.all_special_ids)
    bases, prefix_ids = [], []
    for r in refs:
        for i, p in enumerate(r.prompts):
            ids = r.completion_ids[i, : int(r.completion_mask[i].sum())].tolist()
            ids = [t for t in ids if t not in special]  # drop the EOS: the cut falls before it
            j = int(rng.integers(len(ids))) if ids else 0
            bases.append(p)
            prefix_ids.append(ids[:j])
    texts = [p.text + tokenizer.decode(ids) for p, ids in zip(bases, prefix_ids)]
    # room for the teacher's prefix after the prompt (as planted_error_recovery leaves): a cut would drop the question
    room = max_prompt_tokens + params.max_new_tokens
    teacher_lp = _next_token_logprobs(teacher_model, tokenizer, texts, params.temperature, room)
    allowed = torch.ones(teacher_lp.shape[1], dtype=torch.bool)
    allowed[len(tokenizer):] = False  # ids past the tokenizer are padding of the LM head
    allowed[list(special)] = False
    conts, skipped = [], 0
    for text, lp in zip(texts, teacher_lp):
        candidates = torch.nonzero(allowed & (lp < settings.threshold)).flatten().tolist()
        if not candidates:  # the teacher finds every token plausible here: nothing to force
            skipped += 1
            continue
        forced = candidates[int(rng.integers(len(candidates)))]
        conts.append(Prompt(text=text + tokenizer.decode([forced]), source=""))
    out: dict = {"eval/recovery_skipped": float(skipped)} if skipped else {}
    if not conts:
        return out
    cont_params = SamplingParams(params.temperature, params.top_p, settings.horizon, params.stop, params.decoder)
    took = []
    for r in _continue(student, tokenizer, conts, cont_params, seed=seed + 2, batch_size=batch_size,
                       max_prompt_tokens=room + 1):
        s = teacher.score(r)
        took.append(recovered_within(s.token_logprobs, r.completion_mask * s.scored_mask, settings.window,
                                     settings.threshold))
    took_t = torch.cat(took)
    out["eval/recovery_rate_likelihood"] = float((took_t > 0).float().mean())
    if (took_t > 0).any():
        out["eval/recovery_tokens_mean"] = float(took_t[took_t > 0].float().mean())
    return out


def recovery_eval(student, teacher, tokenizer, prompts: list[Prompt], params: SamplingParams,
                  settings: RecoverySettings, *, seed: int, max_prompt_tokens: int = 256, teacher_model=None) -> dict:
    """Both measurements on the first settings.size prompts; eval/recovery_rate is the verified one where it exists.
    The likelihood one runs where the teacher's weights are at hand (`teacher_model`, else `teacher.model`)."""
    prompts = prompts[: settings.size]
    if not prompts:
        return {}
    seed = int(np.random.default_rng([seed, 0x2EC0]).integers(2**31))  # streams apart from the plain eval's
    teacher_model = getattr(teacher, "model", None) if teacher_model is None else teacher_model
    out: dict = {}
    if teacher_model is not None:
        out = likelihood_recovery(student, teacher, tokenizer, prompts, params, settings, seed=seed,
                                  max_prompt_tokens=max_prompt_tokens, teacher_model=teacher_model)
    verified = planted_error_recovery(student, tokenizer, prompts, params, seed=seed,
                                      batch_size=getattr(teacher, "batch_size", 64), max_prompt_tokens=max_prompt_tokens)
    if verified is not None:
        out.update(verified)
    elif "eval/recovery_rate_likelihood" in out:
        out["eval/recovery_rate"] = out["eval/recovery_rate_likelihood"]
    return out
