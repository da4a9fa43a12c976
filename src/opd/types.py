"""What crosses a stage boundary: prompts -> rollout -> teacher scores -> feedback -> update.

Tensors are laid out [batch, completion position]; `completion_mask` marks real completion
tokens (1) versus padding after EOS (0). Prompt tokens never appear in these per-token tensors,
so no prompt or padding token can reach a loss by construction.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch


# policy_version of a row the student did not sample (offline teacher data): never stale, never importance-weighted.
TEACHER_WRITTEN = -1


def rows_of(ids: list[int]) -> slice | torch.Tensor:
    """The index `select` takes rows with: a slice (views, no copy) where the rows are a run a, a + 1, ..., b - 1,
    as every micro-batch of the update is; an index tensor (copies) otherwise. A micro-batch of the whole batch
    copied the teacher's [B, T, V] distribution (~50 MB at batch 4 x 64 tokens) before."""
    if ids and ids == list(range(ids[0], ids[0] + len(ids))) and ids[0] >= 0:
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Prompt:
    text: str  # rendered prompt text (chat template already applied for chat records)
    source: str  # name of the source it came from (metrics are split by it)
    answer: str | None = None  # reference answer, when the source has one
    task: str | None = None  # built-in task whose verifier checks completions
    messages: tuple[dict, ...] | None = None  # chat records: the messages, for a teacher that renders its own template


@dataclass
class Rollout:
    """Student samples for a batch of prompts, as the sampler produced them."""

    prompts: list[Prompt]
    prompt_ids: torch.Tensor  # [B, P] left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] 1 = real prompt token
    completion_ids: torch.Tensor  # [B, T] right-padded after EOS
    completion_mask: torch.Tensor  # [B, T] 1 = completion token (EOS included)
    behaviour_logprobs: torch.Tensor  # [B, T] log prob under the sampling distribution, fp32
    policy_version: torch.Tensor  # [B] optimizer step of the weights that sampled each sequence; TEACHER_WRITTEN
                                  # for the offline baseline's stored teacher completions (no student sampled them)
    texts: list[str]  # decoded completions (special tokens removed)
    finished: torch.Tensor  # [B] bool: ended by EOS or a stop string (False = hit max_new_tokens)
    temperature: float = 1.0
    # Where the distribution sampled from is not the student's softmax: teacher-guided rollouts (rollout.teacher_mix /
    # teacher_correct_topk) and top-p sampling (rollout.top_p < 1). None for plain student sampling.
    student_logprobs: torch.Tensor | None = None  # [B, T] log pi_theta(a_t) at sampling time, untruncated
    teacher_share: torch.Tensor | None = None  # [B, T] 1 = a token the teacher replaced; mixture: P(teacher component | a_t)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def policy_logprobs(self) -> torch.Tensor:
        """log pi_theta(a_t | s_t) of the student that sampled: what A_t compares the teacher with."""
        return self.behaviour_logprobs if self.student_logprobs is None else self.student_logprobs

    def select(self, idx: torch.Tensor | list[int]) -> "Rollout":
        ids = torch.as_tensor(idx, dtype=torch.long).tolist()
        idx_t = rows_of(ids)
        return Rollout(
            prompts=[self.prompts[i] for i in ids],
            prompt_ids=self.prompt_ids[idx_t],
            prompt_mask=self.prompt_mask[idx_t],
            completion_ids=self.completion_ids[idx_t],
            completion_mask=self.completion_mask[idx_t],
            behaviour_logprobs=self.behaviour_logprobs[idx_t],
            policy_version=self.policy_version[idx_t],
            texts=[self.texts[i] for i in ids],
            finished=self.finished[idx_t],
            temperature=self.temperature,
            student_logprobs=None if self.student_logprobs is None else self.student_logprobs[idx_t],
            teacher_share=None if self.teacher_share is None else self.teacher_share[idx_t],
        )


@dataclass
class TeacherScores:
    """The teacher's view of the student's own prefixes, aligned with Rollout.completion_ids."""

    token_logprobs: torch.Tensor  # [B, T] log pi_T(a_t | s, a_<t), fp32, 0 where not scored
    scored_mask: torch.Tensor  # [B, T] 1 = this completion token has a teacher logprob
    topk_ids: torch.Tensor | None = None  # [B, T, K]
    topk_logprobs: torch.Tensor | None = None  # [B, T, K]
    full_logprobs: torch.Tensor | None = None  # [B, T, V] only when an objective needs the full distribution
    entropy: torch.Tensor | None = None  # [B, T] teacher entropy at each student state, where known
    rewards: torch.Tensor | None = None  # [B] sequence-level reward from a score-only teacher, NaN where none
    advantages: torch.Tensor | None = None  # [B, T] A_t computed by the teacher (cross-tokenizer: its chunk's advantage)
    coverage: float | None = None  # fraction of the completion text the teacher scored, when not every token maps 1:1
    coverage_bytes: tuple[int, int] | None = None  # (covered, total) text bytes behind `coverage`, for joining shares
    latency_s: float = 0.0
    failures: int = 0
    tokens_scored: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # teacher access: retries, drops, latency, cache

    def select(self, idx: torch.Tensor | list[int]) -> "TeacherScores":
        idx_t = rows_of(torch.as_tensor(idx, dtype=torch.long).tolist())

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx_t]

        return TeacherScores(
            token_logprobs=self.token_logprobs[idx_t],
            scored_mask=self.scored_mask[idx_t],
            topk_ids=pick(self.topk_ids),
            topk_logprobs=pick(self.topk_logprobs),
            full_logprobs=pick(self.full_logprobs),
            entropy=pick(self.entropy),
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
        )

    def fit_vocab(self, width: int) -> "TeacherScores":
        """The distributions over the student's LM head of `width` ids. One tokenizer, but heads padded to different
        widths (Qwen2.5-0.5B 151,936 vs 7B 152,064): ids past the tokenizer are never real tokens. A wider teacher's
        extra ids are dropped (and its distribution renormalised over the student's); a narrower one gives the
        student's extra ids its least likely token's logprob (finite: a reverse KL against -inf is infinite). Top-k
        entries past the student's head are emptied (id 0, logprob -inf: no mass, opd.objectives.topk_kl)."""
        out = self
        full = self.full_logprobs
        if full is not None and full.shape[-1] != width:
            if full.shape[-1] > width:
                full = full[..., :width]
            else:
                floor = full.min(-1, keepdim=True).values
                full = torch.cat([full, floor.expand(*full.shape[:-1], width - full.shape[-1])], -1)
            out = copy.copy(out)
            out.full_logprobs = full - torch.logsumexp(full, -1, keepdim=True)
        if self.topk_ids is not None and bool((self.topk_ids >= width).any()):
            past = self.topk_ids >= width
            out = copy.copy(out)
            out.topk_ids = self.topk_ids.masked_fill(past, 0)
            out.topk_logprobs = self.topk_logprobs.masked_fill(past, float("-inf"))
        return out


@dataclass
class Feedback:
    """Token-level learning signal derived from teacher and student logprobs."""

    advantages: torch.Tensor  # [B, T] fp32 (detached)
    loss_mask: torch.Tensor  # [B, T] 1 = token enters the loss
    raw_advantages: torch.Tensor  # [B, T] log pi_T - log pi_theta before clipping/normalising/discounting
    rewards: torch.Tensor | None = None  # [B] task rewards (hybrid objective), when computed
    metrics: dict[str, float] = field(default_factory=dict)

    def select(self, idx: torch.Tensor | list[int]) -> "Feedback":
        idx_t = rows_of(torch.as_tensor(idx, dtype=torch.long).tolist())
        return Feedback(
            advantages=self.advantages[idx_t],
            loss_mask=self.loss_mask[idx_t],
            raw_advantages=self.raw_advantages[idx_t],
            rewards=None if self.rewards is None else self.rewards[idx_t],
        )
