"""Stage 3 across tokenizers: a teacher with another vocabulary scores the student's own text.

The student's completion text is re-tokenised by the teacher (its prompt rendered for the teacher too,
with the teacher's own chat template), the teacher scores its tokens in one forward pass, and the two
tokenisations are aligned on byte offsets into chunks (opd.teacher.alignment). For each chunk

    A_chunk = sum of teacher logprobs over its teacher tokens - sum of student logprobs over its student tokens

is the advantage of every student token in it: the policy gradient of the chunk as one action. A
completion that ends with the student's end token is paired with the teacher's end token as a last
chunk of its own. Student tokens outside aligned chunks are not scored (scored_mask 0), and
`coverage` is the fraction of the batch's text bytes inside aligned chunks (`teacher/coverage`).

With the student's own tokenizer the teacher sees the student's ids unchanged, every chunk is one token,
and the scores equal LocalTeacher's exactly.
"""

from __future__ import annotations

import time

import torch

from opd.rollout.sampler import END_OF_TURN_MARKERS, encode_prompts, end_token_ids
from opd.teacher.alignment import Chunk, align, covered_bytes, token_ends
from opd.teacher.local import LocalTeacher
from opd.types import Prompt, Rollout, TeacherScores


def same_vocabulary(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def render_for_teacher(prompt: Prompt, tokenizer) -> str:
    """A chat prompt in the teacher's own template; a base model without one gets the plain messages."""
    if prompt.messages is None:
        return prompt.text
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in prompt.messages) + "\n\n"


class CrossTokenizerTeacher:
    def __init__(self, teacher: LocalTeacher, student_tokenizer, teacher_tokenizer, *, max_prompt_tokens: int = 512):
        self.teacher = teacher
        self.student_tok = student_tokenizer
        self.teacher_tok = teacher_tokenizer
        self.identical = same_vocabulary(student_tokenizer, teacher_tokenizer)
        self.student_end_ids = set(end_token_ids(student_tokenizer))
        self.teacher_end_id = self._teacher_end_id()
        self.max_prompt_tokens = max_prompt_tokens
        self.anchor_ids = self._dummy_prefix_anchor()

    @property
    def batch_size(self) -> int:
        return self.teacher.batch_size

    def _teacher_end_id(self) -> int:
        """The token that ends a completion for the teacher: its template's end of turn, else EOS."""
        template = str(getattr(self.teacher_tok, "chat_template", None) or "")
        for marker in END_OF_TURN_MARKERS:
            token_id = self.teacher_tok.convert_tokens_to_ids(marker) if marker in template else None
            if token_id is not None and token_id != self.teacher_tok.unk_token_id:
                return token_id
        return self.teacher_tok.eos_token_id

    ANCHOR = "\n"

    def _dummy_prefix_anchor(self) -> list[int] | None:
        """The anchor's ids where the teacher's tokenizer starts every text it tokenises with a dummy '▁' (the
        SentencePiece tokenizers of Llama-2, Mistral v0.1, Phi-3: a Prepend('▁') normalizer), else None. Tokenised on
        its own, a completion would begin with a space the student never wrote; after the anchor it does not."""
        tok, a = self.teacher_tok, self.ANCHOR
        anchor = tok(a, add_special_tokens=False)["input_ids"]
        joint = tok(a + "a", add_special_tokens=False)["input_ids"]
        if joint[: len(anchor)] != anchor or joint[len(anchor):] == tok("a", add_special_tokens=False)["input_ids"]:
            return None
        return anchor

    def continuation_ids(self, text: str) -> list[int]:
        """The teacher's ids for `text` as it continues a prompt (with no dummy prefix)."""
        # split_special_tokens: a special token's string the student wrote as text ("<eos>" in Gemma's vocabulary) is
        # text to the teacher too, not its end token (which decodes to nothing and stopped the alignment there)
        enc = lambda t: self.teacher_tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
        if self.anchor_ids is None:
            return enc(text)
        n = len(self.anchor_ids)
        joint = enc(self.ANCHOR + text)
        if joint[:n] == self.anchor_ids:
            return joint[n:]
        return enc(text)  # merged with the anchor: as it was

    def _teacher_prefixes(self, ids: list[int]) -> list[str]:
        """The text of each prefix of the teacher's completion ids, decoded after the anchor where there is one: such a
        decoder strips the dummy space from the start of what it decodes, which would hide a space the student wrote."""
        if self.anchor_ids is None:
            return self._decode_prefixes(self.teacher_tok, ids)
        n = len(self.teacher_tok.decode(self.anchor_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        return [t[n:] for t in self._decode_prefixes(self.teacher_tok, self.anchor_ids + ids)[len(self.anchor_ids):]]

    def _decode_prefixes(self, tokenizer, ids: list[int]) -> list[str]:
        return tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    def align_sequence(self, student_ids: list[int], finished: bool = True) -> tuple[list[int], list[Chunk], int, int]:
        """(teacher completion ids, chunks over student/teacher token indices, covered bytes, text bytes).
        finished = False (cut by max_new_tokens): the last chunk is left unscored. Its text may end inside a word or a
        character the student had not finished writing; the teacher, reading it as a whole token (a cut UTF-8 byte
        as U+FFFD), gave it an advantage of -9 to -14 on text it would continue with probability ~0.95."""
        ends_with_end = bool(student_ids) and student_ids[-1] in self.student_end_ids
        body = student_ids[:-1] if ends_with_end else student_ids
        prefixes = self._decode_prefixes(self.student_tok, body)
        text = prefixes[-1] if prefixes else ""
        n_bytes = len(text.encode("utf-8"))
        if self.identical:  # the student's own ids: nothing to re-tokenise, every token is its own chunk
            t_body, t_end = list(body), (student_ids[-1] if ends_with_end else None)
            chunks = [Chunk(0, n_bytes, range(k, k + 1), range(k, k + 1)) for k in range(len(body))]  # spans unused
            covered = n_bytes
        else:
            t_body = self.continuation_ids(text)
            t_end = self.teacher_end_id
            chunks = align(token_ends(prefixes, text), token_ends(self._teacher_prefixes(t_body), text))
            if not finished and not ends_with_end and chunks:
                chunks = chunks[:-1]
            covered = covered_bytes(chunks)
        if ends_with_end and covered == n_bytes:  # both end right after the same text: pair the end tokens
            chunks.append(Chunk(n_bytes, n_bytes, range(len(body), len(body) + 1), range(len(t_body), len(t_body) + 1)))
            t_body = t_body + [t_end]
        return t_body, chunks, covered, n_bytes

    def teacher_rollout(self, rollout: Rollout, teacher_ids: list[list[int]]) -> Rollout:
        if self.identical:
            prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
        else:
            prompts = [Prompt(text=render_for_teacher(p, self.teacher_tok), source=p.source) for p in rollout.prompts]
            # no template of the teacher's in the text (a plain prompt, or messages a base model reads as text): a
            # special token's string a user wrote ("What does <eos> do?") is text, not the teacher's end token
            templated = bool(getattr(self.teacher_tok, "chat_template", None))
            as_text = [p.messages is None or not templated for p in rollout.prompts]
            prompt_ids, prompt_mask = encode_prompts(self.teacher_tok, prompts, self.max_prompt_tokens, as_text)
        B, T = len(teacher_ids), max(1, max(len(t) for t in teacher_ids))
        ids = torch.full((B, T), self.teacher_tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, t in enumerate(teacher_ids):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = 1
        return Rollout(prompts=rollout.prompts, prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids,
                       completion_mask=mask, behaviour_logprobs=torch.zeros((B, T)),
                       policy_version=rollout.policy_version, texts=rollout.texts, finished=rollout.finished,
                       temperature=rollout.temperature)

    @torch.no_grad()
    def score(self, rollout: Rollout, *, full: bool = False) -> TeacherScores:
        if full:
            raise ValueError("full-distribution objectives need one shared vocabulary; use objective.name = 'pg'")
        t0 = time.perf_counter()
        aligned = [self.align_sequence(row[m.bool()].tolist(), bool(done))
                   for row, m, done in zip(rollout.completion_ids, rollout.completion_mask, rollout.finished)]
        t_scores = self.teacher.score(self.teacher_rollout(rollout, [a[0] for a in aligned]))
        B, T = rollout.completion_ids.shape
        token_lp = torch.zeros((B, T))
        adv = torch.zeros((B, T))
        ent = torch.zeros((B, T))
        scored = torch.zeros((B, T), dtype=torch.long)
        behaviour = rollout.policy_logprobs  # the student's own (top-p: untruncated), as A_t is for one tokenizer
        for i, (_, chunks, _, _) in enumerate(aligned):
            for c in chunks:
                s_idx, t_idx = list(c.student), list(c.teacher)
                t_sum = t_scores.token_logprobs[i, t_idx].sum()
                s_sum = behaviour[i, s_idx].sum()
                adv[i, s_idx] = t_sum - s_sum
                # Per-token teacher logprobs whose chunk sum is the teacher's: log-ratio metrics stay sums over text.
                token_lp[i, s_idx] = t_sum if len(s_idx) == 1 else behaviour[i, s_idx] + (t_sum - s_sum) / len(s_idx)
                ent[i, s_idx] = t_scores.entropy[i, t_idx].mean()
                scored[i, s_idx] = 1
        total = sum(a[3] for a in aligned)
        return TeacherScores(
            token_logprobs=token_lp,
            scored_mask=scored * rollout.completion_mask,
            entropy=ent,
            advantages=adv,
            coverage=sum(a[2] for a in aligned) / total if total else 1.0,
            coverage_bytes=(sum(a[2] for a in aligned), total),
            latency_s=time.perf_counter() - t0,
            tokens_scored=t_scores.tokens_scored,
        )
