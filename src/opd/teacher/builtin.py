"""The built-in teacher: a tiny LlamaForCausalLM with a character-level tokenizer, trained from
scratch on the `arith` task's reference solutions (`opd teacher train`), and the config of the
smaller built-in student. Both are saved with `save_pretrained`, so they load like any HF model.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.models import build_char_tokenizer
from opd.prompts.tasks import get_task
from opd.rollout import SamplingParams, encode_prompts, sample
from opd.prompts import verify
from opd.types import Prompt, Rollout
from opd.logprobs import sampled_logprobs

TEACHER_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4)


def llama_config(tokenizer, shape: dict) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
        **shape,
    )


def reference_batch(tokenizer, prompts: list[Prompt], solve) -> Rollout:
    """A Rollout holding the reference completions (solution + EOS) of `prompts`, for supervised training."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, 256)
    rows = [tokenizer(solve(p.text), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for p in prompts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Rollout(
        prompts=prompts,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=ids,
        completion_mask=mask,
        behaviour_logprobs=torch.zeros(ids.shape),
        policy_version=torch.zeros(len(rows), dtype=torch.long),
        texts=[solve(p.text) for p in prompts],
        finished=torch.ones(len(rows), dtype=torch.bool),
    )


def slipped_batch(tokenizer, task, prompts: list[Prompt], rng, rate: float) -> tuple[Rollout, torch.Tensor]:
    """Reference completions with planted slips (`task.corrupt`) and a [N] weight per completion token
    that is 0 on planted characters: the teacher learns to continue correctly after a slip (as a strong
    model would) without learning to make one."""
    slipped = {p.text: task.corrupt(p.text, rng, rate) for p in prompts}
    batch = reference_batch(tokenizer, prompts, lambda text: slipped[text][0])
    weights = torch.zeros(batch.completion_ids.shape)
    for i, bad in enumerate(slipped[p.text][1] for p in prompts):  # one character = one token (char tokenizer); EOS keeps weight 1
        weights[i, : len(bad) + 1] = torch.tensor([0.0 if b else 1.0 for b in bad] + [1.0])
    return batch, weights[batch.completion_mask.bool()]


def train_builtin_teacher(out: Path, *, task: str = "arith", steps: int = 3000, batch_size: int = 64,
                          lr: float = 3e-3, seed: int = 1234, slip_rate: float = 0.15, log=print) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(llama_config(tokenizer, TEACHER_SHAPE))
    t = get_task(task)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    t0 = time.time()
    model.train()
    for step in range(steps):
        batch, weights = slipped_batch(tokenizer, t, [t.sample(rng) for _ in range(batch_size)], rng, slip_rate)
        loss = -(sampled_logprobs(model, batch, 1.0) * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {float(loss.detach()):.4f}  {time.time() - t0:.0f}s")
    model.eval()
    eval_prompts = [t.sample(np.random.default_rng([seed, 7, i])) for i in range(256)]
    roll = sample(model, tokenizer, eval_prompts, SamplingParams(temperature=1.0, max_new_tokens=96),
                  generator=torch.Generator().manual_seed(seed))
    acc = float(np.mean([verify(p, c) for p, c in zip(eval_prompts, roll.texts)]))
    log(f"teacher accuracy at temperature 1.0 on 256 fresh prompts: {acc:.3f}")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "MADE_BY.md").write_text(
        "# Built-in teacher\n\n"
        f"Made by `opd teacher train --out {out.name} --steps {steps} --seed {seed} --slip-rate {slip_rate}` "
        f"(or `make teacher`) in {time.time() - t0:.0f} s on {platform.processor() or platform.machine()}.\n\n"
        f"A LlamaForCausalLM ({sum(p.numel() for p in model.parameters()):,} parameters, {TEACHER_SHAPE}) "
        f"trained from scratch on the `{task}` task's reference solutions, with slips planted in "
        f"{slip_rate:.0%} of the steps and masked out of the loss (it learns to recover, not to slip).\n"
        f"Accuracy (temperature 1.0, 256 fresh prompts): {acc:.3f}.\n"
    )
    return {"accuracy": acc, "seconds": time.time() - t0}


def write_builtin_student(out: Path) -> None:
    """The built-in student: config + tokenizer only; opd builds it with fresh weights (init = 'random')."""
    tokenizer = build_char_tokenizer()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llama_config(tokenizer, STUDENT_SHAPE).save_pretrained(out)
    tokenizer.save_pretrained(out)
