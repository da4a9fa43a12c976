import pytest
import torch

from opd.logprobs import completion_hidden, per_position
from opd.rollout import SamplingParams, encode_prompts, sample, sampling_logprobs
from opd.types import Prompt


def recompute(model, roll):
    m = roll.completion_mask.bool()
    targets = roll.completion_ids[m]
    h = completion_hidden(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)
    (lp,) = per_position(model, h, lambda logp, sl: (logp.gather(1, targets[sl, None]).squeeze(1),), roll.temperature, 7)
    return lp


def test_behaviour_logprobs_match_recomputed_student_logprobs(student, tokenizer, prompts):
    # The KV-cached sampler and the one-pass scorer must agree while the policy has not changed.
    for temperature in (1.0, 0.6):
        roll = sample(student, tokenizer, prompts, SamplingParams(temperature=temperature, max_new_tokens=16),
                      generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = recompute(student, roll)
        torch.testing.assert_close(lp, roll.behaviour_logprobs[roll.completion_mask.bool()], rtol=0, atol=5e-5)


def test_padding_and_eos_layout(student, tokenizer, prompts):
    # Make EOS likely so that some sequences end early and others run to max_new_tokens.
    with torch.no_grad():
        student.lm_head.weight[tokenizer.eos_token_id] *= 0
        student.lm_head.weight[tokenizer.eos_token_id] += student.model.norm.weight.sign() * 0.02
    roll = sample(student, tokenizer, prompts * 4, SamplingParams(max_new_tokens=10), generator=torch.Generator().manual_seed(6))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lengths = roll.completion_mask.sum(1)
    assert roll.finished.any() and (lengths < roll.completion_ids.shape[1]).any()
    for i in range(len(roll.texts)):
        n = int(lengths[i])
        assert roll.completion_mask[i, :n].all() and not roll.completion_mask[i, n:].any()  # a prefix of ones
        ids = roll.completion_ids[i]
        assert (ids[n:] == pad).all() and (roll.behaviour_logprobs[i, n:] == 0).all()
        if roll.finished[i]:
            assert ids[n - 1] == eos and eos not in ids[: n - 1].tolist()  # EOS ends and belongs to the completion
        else:
            assert n == 10 and eos not in ids[:n].tolist()
        assert roll.texts[i] == tokenizer.decode(ids[:n], skip_special_tokens=True)
    # Left padding of prompts.
    for i, p in enumerate(roll.prompts):
        real = roll.prompt_ids[i][roll.prompt_mask[i].bool()].tolist()
        assert real == tokenizer(p.text)["input_ids"]
        assert roll.prompt_mask[i].tolist() == sorted(roll.prompt_mask[i].tolist())


def test_stop_strings_end_the_completion(student, tokenizer):
    prompts = [Prompt(text="1+1=", source="t")] * 8
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=30, stop=["5"]),
                  generator=torch.Generator().manual_seed(2))
    for text, fin in zip(roll.texts, roll.finished):
        if fin and "5" in text:
            assert text.index("5") == len(text) - 1  # nothing after the first stop string
        if not fin:
            assert "5" not in text


def test_same_seed_same_rollout_and_version_recorded(student, tokenizer, prompts):
    a = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=8), policy_version=7, generator=torch.Generator().manual_seed(9))
    b = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=8), policy_version=7, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert a.policy_version.tolist() == [7] * len(prompts)


def test_top_p_distribution():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    p = torch.softmax(logits, -1)[0]
    lp = sampling_logprobs(logits, 1.0, top_p=float(p[0] + p[1] - 1e-4))
    # The smallest prefix reaching top_p keeps tokens 0 and 1, renormalised.
    assert torch.isinf(lp[0, 2]) and torch.isinf(lp[0, 3])
    torch.testing.assert_close(lp[0, :2].exp(), p[:2] / p[:2].sum())
    assert torch.isfinite(sampling_logprobs(logits, 1.0, top_p=1e-6)[0, 0])  # the top token always survives
    torch.testing.assert_close(sampling_logprobs(logits, 2.0, 1.0), torch.log_softmax(logits / 2.0, -1))


@pytest.mark.parametrize("text", ["abcdefgh", "<s>abcdefgh"])  # BOS added by the tokenizer, or by a chat template
def test_prompt_truncation_keeps_the_end_and_the_bos(tokenizer, text):
    # A model reads a prompt without its BOS as something else (Gemma: ~1 nat a token), so truncation keeps it.
    ids, mask = encode_prompts(tokenizer, [Prompt(text=text, source="t")], max_prompt_tokens=3)
    assert ids[0].tolist() == [tokenizer.bos_token_id] + tokenizer("gh", add_special_tokens=False)["input_ids"]
    assert mask.sum() == 3
    ids, _ = encode_prompts(tokenizer, [Prompt(text=text, source="t")], max_prompt_tokens=1)
    assert tokenizer.decode(ids[0]) == "h"  # no room for it: the end wins


def test_bos_not_doubled_for_templated_prompts(tokenizer):
    ids, mask = encode_prompts(tokenizer, [Prompt(text="<s>ab", source="t")], 10)
    assert ids[0][mask[0].bool()].tolist().count(tokenizer.bos_token_id) == 1


def _chatml_tokenizer():
    from opd.models import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_end_token_ids_add_the_chat_templates_end_of_turn(tokenizer):
    from opd.rollout.sampler import end_token_ids

    assert end_token_ids(tokenizer) == [tokenizer.eos_token_id]  # no chat template: EOS only
    chat = _chatml_tokenizer()
    assert end_token_ids(chat) == sorted([chat.eos_token_id, chat.convert_tokens_to_ids("<|im_end|>")])


def test_a_chat_completion_ends_at_the_end_of_turn_token():
    from tests.conftest import tiny_model

    tok = _chatml_tokenizer()
    model = tiny_model(tok, 0)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> the likely next token everywhere
        model.lm_head.weight[end] = model.model.norm.weight.sign() * 5.0
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    roll = sample(model, tok, [Prompt(text=text, source="t")] * 4, SamplingParams(max_new_tokens=20),
                  generator=torch.Generator().manual_seed(0))
    assert roll.finished.all()
    for i in range(4):
        n = int(roll.completion_mask[i].sum())
        assert roll.completion_ids[i, n - 1] == end and end not in roll.completion_ids[i, : n - 1].tolist()
        assert "<|im_end|>" not in roll.texts[i]


def test_sampling_copy_is_low_precision_and_refreshed_from_the_trained_weights(student, tokenizer, prompts):
    from opd.rollout import SamplingCopy

    copy = SamplingCopy(student, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.model.parameters())
    assert all(b.dtype == ob.dtype for b, ob in zip(copy.model.buffers(), student.buffers()))  # buffers untouched
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the student itself is not converted
    with torch.no_grad():
        student.lm_head.weight[5] += 1.0  # a training step changed the student
    model = copy.refresh(student)
    torch.testing.assert_close(model.lm_head.weight[5].float(), student.lm_head.weight[5], rtol=1e-2, atol=1e-2)
    # The copy samples; the fp32 student recomputes: close (bf16 rounding), not bit-equal.
    roll = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = recompute(student, roll)
    diff = (lp - roll.behaviour_logprobs[roll.completion_mask.bool()]).abs()
    assert diff.max() < 0.2 and diff.mean() < 0.05


def test_the_c_draw_picks_the_tokens_of_torchs_inverse_cdf():
    import torch.nn.functional as F

    from opd import cpu_kernels
    from opd.rollout.guidance import inverse_cdf

    if cpu_kernels._sample_library() is None:
        pytest.skip("csrc/sample.c needs x86 AVX2 + a C compiler")
    g = torch.Generator().manual_seed(0)
    for V, T, dtype in ((49152, 1.0, torch.float32), (301, 0.7, torch.float32), (1000, 1.3, torch.bfloat16)):
        logits = (torch.randn(6, V, generator=g) * 3).to(dtype)
        logits[0, 5:] = float("-inf")  # a row where only 5 tokens have mass
        logits[1, :-1] = float("-inf")  # ... and one where only the last has
        for _ in range(20):
            u = 1.0 - torch.rand(6, generator=g, dtype=torch.float64)
            tok, lp = cpu_kernels.sample_rows(logits, T, u)
            logp = F.log_softmax(logits.float() / T, -1)
            want = inverse_cdf(logp.exp(), u)
            # the same token, but where u falls within float rounding of a boundary of the running sum
            cdf = logp.exp().double().cumsum(-1)
            for r in (tok != want).nonzero()[:, 0].tolist():
                edge = cdf[r, min(int(tok[r]), int(want[r]))] / cdf[r, -1]
                assert abs(float(edge) - float(u[r])) < 1e-5 and abs(int(tok[r]) - int(want[r])) == 1
            assert (tok[0] < 5).all() and tok[1] == V - 1  # never a token of mass 0
            torch.testing.assert_close(lp, logp.gather(1, tok[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)


def test_draw_token_spends_the_generator_as_draw_does_on_either_path(monkeypatch):
    from opd import cpu_kernels
    from opd.rollout.guidance import draw
    from opd.rollout.sampler import draw_token, sampling_logprobs

    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3)) * 2
    want = draw(sampling_logprobs(logits, 0.8, 1.0).exp(), torch.Generator().manual_seed(9))
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_kernels, "sample_rows", lambda *a: None)
        tok, lp = draw_token(logits, 0.8, 1.0, torch.Generator().manual_seed(9))
        assert torch.equal(tok, want)
        torch.testing.assert_close(lp, sampling_logprobs(logits, 0.8, 1.0).gather(1, tok[:, None]).squeeze(1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused_on_either_path_not_drawn_from(monkeypatch, bad):
    # A diverged student: the C pass had taken a NaN logit for a token of mass ~0 and drawn from the rest, torch's
    # path a token of the NaN distribution; both now name the fault. A last NaN (after the 8-wide part) as well.
    from opd import cpu_kernels
    from opd.rollout.sampler import draw_token

    if cpu_kernels._sample_library() is not None:
        logits = torch.full((2, 64), float("-inf"))
        logits[0, 3] = 0.0
        tok, lp = cpu_kernels.sample_rows(logits, 1.0, torch.ones(2, dtype=torch.float64))
        assert tok[0] == 3 and lp[0] == 0.0 and tok[1] == -1 and lp[1].isnan()  # no finite logit: nothing to draw
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu_kernels, "sample_rows", lambda *a: None)
        for col in (7, 500):
            logits = torch.randn(3, 501, generator=torch.Generator().manual_seed(1))
            logits[1, col] = bad
            with pytest.raises(FloatingPointError, match=r"NaN or infinite in 1 of 3 row\(s\)"):
                draw_token(logits, 1.0, 1.0, torch.Generator().manual_seed(2))
