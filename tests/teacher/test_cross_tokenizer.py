"""Cross-tokenizer scoring: chunk advantages against a naive per-prefix teacher, exact reduction to the
same-tokenizer teacher, and the config checks that route a run to it."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from opd.config import ConfigError, load_config
from opd.feedback import compute_feedback
from opd.config import FeedbackConfig
from opd.loop import make_teacher
from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher
from opd.teacher.cross_tokenizer import CrossTokenizerTeacher, render_for_teacher
from opd.types import Prompt
from tests.conftest import tiny_model

CORPUS = ["12+345=357", "9+9=18", "1234+5678=6912", "hello world", "the cat sat on the mat", "abc abc abc"] * 20


def byte_bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained in memory: merges digits and words, splits characters into bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def rollout_of(model, tok, prompts, seed=0, n=24):
    return sample(model, tok, prompts, SamplingParams(temperature=1.0, max_new_tokens=n), generator=torch.Generator().manual_seed(seed))


def naive_logprobs(model, prompt_ids, ids, temperature=1.0):
    out = []
    with torch.no_grad():
        for t in range(len(ids)):
            logits = model(input_ids=torch.tensor([prompt_ids + ids[:t]])).logits[0, -1].float() / temperature
            out.append(float(F.log_softmax(logits, -1)[ids[t]]))
    return out


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_identical_tokenizers_reduce_exactly_to_the_local_teacher(which, tokenizer, bpe, prompts):
    tok = tokenizer if which == "char" else bpe
    student, teacher_model = tiny_model(tok, 0), tiny_model(tok, 1, hidden_size=32, num_hidden_layers=1)
    with torch.no_grad():  # let some completions end with EOS
        student.lm_head.weight[tok.eos_token_id] = student.model.norm.weight.sign() * 0.05
    for seed in range(3):
        roll = rollout_of(student, tok, prompts, seed)
        local = LocalTeacher(teacher_model, batch_size=4, chunk_size=7).score(roll)
        cross = CrossTokenizerTeacher(LocalTeacher(teacher_model, batch_size=4, chunk_size=7), tok, tok).score(roll)
        assert torch.equal(cross.token_logprobs, local.token_logprobs)
        assert torch.equal(cross.scored_mask, local.scored_mask) and cross.coverage == 1.0
        cfg = FeedbackConfig()
        assert torch.equal(compute_feedback(roll, cross, cfg).advantages, compute_feedback(roll, local, cfg).advantages)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.booleans())
def test_identical_tokenizer_alignment_is_one_chunk_per_token(bpe, text, end):
    ids = bpe(text, add_special_tokens=False)["input_ids"] + ([bpe.eos_token_id] if end else [])
    t_ids, chunks, covered, n_bytes = CrossTokenizerTeacher(None, bpe, bpe).align_sequence(ids)
    assert t_ids == ids and covered == n_bytes
    assert [(c.student, c.teacher) for c in chunks] == [(range(k, k + 1), range(k, k + 1)) for k in range(len(ids))]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30))
def test_chunks_of_two_real_tokenizers_spell_the_same_text(tokenizer, bpe, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assume(tokenizer.decode(ids, skip_special_tokens=True) == text)  # e.g. "<s>" is a special token of the student
    t_ids, chunks, covered, n_bytes = CrossTokenizerTeacher(None, tokenizer, bpe).align_sequence(ids)
    assert covered == n_bytes == len(text.encode())
    assert [k for c in chunks for k in c.student] == list(range(len(ids)))
    assert [k for c in chunks for k in c.teacher] == list(range(len(t_ids)))
    for c in chunks:
        assert tokenizer.decode([ids[k] for k in c.student]) == bpe.decode([t_ids[k] for k in c.teacher])


def test_chunk_advantages_equal_teacher_sums_minus_student_sums(tokenizer, bpe):
    student = tiny_model(tokenizer, 0)
    with torch.no_grad():
        student.lm_head.weight[tokenizer.eos_token_id] = student.model.norm.weight.sign() * 0.05
    teacher_model = tiny_model(bpe, 1, hidden_size=32, num_hidden_layers=1)
    prompts = [Prompt(text=t, source="t") for t in ["12+345=", "hello ", "the cat", "9+9="] * 3]
    roll = rollout_of(student, tokenizer, prompts, seed=4, n=20)
    assert roll.finished.any() and not roll.finished.all()
    teacher = CrossTokenizerTeacher(LocalTeacher(teacher_model, batch_size=3, chunk_size=5), tokenizer, bpe)
    scores = teacher.score(roll)
    # rows cut by max_new_tokens leave their last chunk unscored (it may end inside a word); finished rows are whole
    done = roll.finished
    assert torch.equal(scores.scored_mask[done], roll.completion_mask[done]) and scores.coverage < 1.0
    feedback = compute_feedback(roll, scores, FeedbackConfig())
    saw_end = saw_merge = False
    for i, p in enumerate(prompts):
        n = int(roll.completion_mask[i].sum())
        ids = roll.completion_ids[i, :n].tolist()
        t_ids, chunks, _, _ = teacher.align_sequence(ids, bool(done[i]))
        if not done[i]:
            whole = teacher.align_sequence(ids)[1]
            assert chunks == whole[:-1] and not scores.scored_mask[i, list(whole[-1].student)].any()
        want_t = naive_logprobs(teacher_model, bpe(p.text)["input_ids"], t_ids)
        for c in chunks:
            a = sum(want_t[k] for k in c.teacher) - float(roll.behaviour_logprobs[i, list(c.student)].sum())
            for k in c.student:
                assert abs(float(feedback.advantages[i, k]) - a) < 1e-4
            # Per-token teacher logprobs sum to the chunk's teacher logprob.
            assert abs(float(scores.token_logprobs[i, list(c.student)].sum()) - sum(want_t[k] for k in c.teacher)) < 1e-4
            saw_merge |= len(c.student) > 1
        if ids and ids[-1] == tokenizer.eos_token_id:
            saw_end = True
            assert t_ids[-1] == bpe.eos_token_id and list(chunks[-1].student) == [n - 1]
    assert saw_merge and saw_end  # the case exercised merged chunks and paired end tokens


def test_a_special_tokens_string_written_as_text_stays_text_to_the_teacher(tokenizer, bpe):
    # "</s>" typed by the student (as characters) became the teacher's end token, which decodes to nothing: the
    # alignment stopped there and the rest of the completion went unscored (coverage 0.31 on Gemma with "<eos>")
    text = "ab </s> cd"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    t_ids, chunks, covered, n_bytes = CrossTokenizerTeacher(None, tokenizer, bpe).align_sequence(ids)
    assert bpe.eos_token_id not in t_ids and covered == n_bytes


def test_a_special_tokens_string_in_a_prompt_is_text_to_a_teacher_without_a_template(tokenizer, bpe):
    # "What does </s> do?" gave a template-less teacher its real end token mid-prompt: it scored the completion
    # as if a document had ended
    student = tiny_model(tokenizer, 0)
    teacher = CrossTokenizerTeacher(LocalTeacher(tiny_model(bpe, 1, hidden_size=32, num_hidden_layers=1)), tokenizer,
                                    bpe)
    prompts = [Prompt(text="what does </s> do? ", source="t"),
               Prompt(text="x", source="t", messages=({"role": "user", "content": "say </s> now"},))]
    roll = rollout_of(student, tokenizer, prompts, n=4)
    t_roll = teacher.teacher_rollout(roll, [[5], [5]])
    ids = t_roll.prompt_ids[t_roll.prompt_mask.bool()].tolist()
    assert bpe.eos_token_id not in ids


def test_the_cross_tokenizer_advantage_uses_the_students_own_logprob(tokenizer, bpe, prompts):
    # top-p rollouts: behaviour_logprobs are the nucleus's; A_chunk compares the teacher with the student's softmax
    student = tiny_model(tokenizer, 0)
    teacher = CrossTokenizerTeacher(LocalTeacher(tiny_model(bpe, 1, hidden_size=32, num_hidden_layers=1)), tokenizer,
                                    bpe)
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=12, top_p=0.5),
                  generator=torch.Generator().manual_seed(0))
    scores = teacher.score(roll)
    m = scores.scored_mask.bool()
    plain = roll.select(list(range(len(prompts))))
    plain.behaviour_logprobs = roll.student_logprobs.clone()  # the same rollout, its own logprobs as behaviour
    plain.student_logprobs = None
    torch.testing.assert_close(scores.advantages[m], teacher.score(plain).advantages[m])


def test_prompts_are_rendered_with_the_teachers_own_template(bpe):
    messages = ({"role": "user", "content": "What is 2+2?"},)
    p = Prompt(text="<student template>", source="t", messages=messages)
    assert render_for_teacher(p, bpe) == "What is 2+2?\n\n"  # a base model without a template: plain text
    bpe_chat = byte_bpe_tokenizer()
    bpe_chat.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    assert render_for_teacher(p, bpe_chat) == "[user] What is 2+2?\n[assistant] "
    assert render_for_teacher(Prompt(text="plain", source="t"), bpe_chat) == "plain"


def test_config_routes_different_tokenizers_to_the_cross_teacher(tokenizer, bpe):
    teacher_model = tiny_model(bpe, 1)
    ok = load_config(None, ["objective.name='pg'", "student.warm_start_steps=0"])
    assert isinstance(make_teacher(ok, teacher_model, tokenizer, bpe, "onpolicy"), CrossTokenizerTeacher)
    assert isinstance(make_teacher(ok, teacher_model, tokenizer, tokenizer, "onpolicy"), LocalTeacher)
    for sets, mode, needle in [
        (["objective.name='reverse_kl'", "student.warm_start_steps=0"], "onpolicy", "needs objective.name = 'pg'"),
        (["objective.name='pg'"], "onpolicy", "student.warm_start_steps = 0"),
        (["objective.name='pg'", "student.warm_start_steps=0"], "offline", "offline baseline"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            make_teacher(load_config(None, sets), teacher_model, tokenizer, bpe, mode)


def test_full_distribution_objectives_refuse_a_batch_that_does_not_fit(tokenizer):
    big = load_config(None, ["prompts.batch_size=16", "rollout.max_new_tokens=512"])
    from opd.loop import check_full_distribution_memory

    check_full_distribution_memory(big, 100)  # a small vocabulary fits
    with pytest.raises(ConfigError, match=r"262144 vocabulary.*objective.name = 'pg' or 'topk_kl'"):
        check_full_distribution_memory(big, 262144)


def dummy_prefix_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE (tokenizer.json of Llama-2, Mistral v0.1, Phi-3): a Prepend('▁') normalizer
    that starts every text with a space, byte fallback, and a decoder that strips that space again."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer_tk = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer_tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    # rebuilt without the pre-tokenizer (as Llama-2's tokenizer.json has none), with byte fallback
    trained = json.loads(trainer_tk.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tk = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = trainer_tk.normalizer
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ["<unk>", "<s>", "</s>"]])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.mark.parametrize("completion", ["hello world", " hello", "\n\nthe cat"])
def test_a_dummy_prefix_tokenizer_scores_the_completion_as_it_continues_the_prompt(bpe, completion):
    # Tokenised on its own, "hello world" became "▁hello ▁world": a space the student never wrote, which the
    # decoder's strip hid from the alignment. The teacher must read the ids it would give prompt + completion.
    llama = dummy_prefix_tokenizer()
    cross = CrossTokenizerTeacher(None, bpe, llama)
    prompt = "the cat sat on the mat\n"
    student_ids = bpe(completion, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    t_body, chunks, covered, n_bytes = cross.align_sequence(student_ids)
    whole = llama(prompt + completion, add_special_tokens=False)["input_ids"]
    prompt_ids = llama(prompt, add_special_tokens=False)["input_ids"]
    assert whole[: len(prompt_ids)] == prompt_ids  # the prompt's ids do not change at the seam
    assert t_body[:-1] == whole[len(prompt_ids):] and t_body[-1] == llama.eos_token_id
    assert covered == n_bytes == len(completion.encode())
