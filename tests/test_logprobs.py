import pytest
import torch
import torch.nn.functional as F

from opd.logprobs import completion_hidden, lm_logits, per_position, scatter_tokens


def _hidden(model, n=13):
    torch.manual_seed(0)
    return torch.randn(n, model.config.hidden_size)


def test_chunked_log_softmax_equals_unchunked(student):
    h = _hidden(student)
    targets = torch.randint(0, student.config.vocab_size, (h.shape[0],))
    full = F.log_softmax(lm_logits(student, h, 0.7), dim=-1)
    want_lp = full.gather(1, targets[:, None]).squeeze(1)
    want_ent = -(full.exp() * full).sum(-1)

    def fn(logp, sl):
        return logp.gather(1, targets[sl, None]).squeeze(1), -(logp.exp() * logp).sum(-1)

    for chunk in (1, 3, 5, 13, 1000):
        lp, ent = per_position(student, h, fn, 0.7, chunk)
        torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-6)
        torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-6)


def test_chunked_gradient_equals_unchunked(student):
    h = _hidden(student).requires_grad_(True)
    targets = torch.randint(0, student.config.vocab_size, (h.shape[0],))
    full = F.log_softmax(lm_logits(student, h, 1.0), dim=-1).gather(1, targets[:, None]).sum()
    (g_full,) = torch.autograd.grad(full, h)
    (lp,) = per_position(student, h, lambda logp, sl: (logp.gather(1, targets[sl, None]).squeeze(1),), 1.0, 4)
    (g_chunk,) = torch.autograd.grad(lp.sum(), h)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-6)


def test_softcapping_is_applied(student):
    h = _hidden(student, 4) * 50
    plain = lm_logits(student, h, 1.0)
    student.config.final_logit_softcapping = 2.0
    try:
        capped = lm_logits(student, h, 1.0)
    finally:
        student.config.final_logit_softcapping = None
    assert capped.abs().max() <= 2.0 + 1e-6
    torch.testing.assert_close(capped, torch.tanh(plain / 2.0) * 2.0)


def test_completion_hidden_picks_states_before_each_completion_token(student):
    # Left-padded prompt of length 3 inside width 5, completion of 2 real tokens + 1 pad.
    prompt_ids = torch.tensor([[0, 0, 1, 20, 21]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1]])
    comp = torch.tensor([[22, 2, 0]])
    cmask = torch.tensor([[1, 1, 0]])
    h = completion_hidden(student, prompt_ids, prompt_mask, comp, cmask)
    assert h.shape == (2, student.config.hidden_size)
    # The same without any padding: states at the last prompt token and the first completion token.
    ref = student.base_model(input_ids=torch.tensor([[1, 20, 21, 22]])).last_hidden_state[0, 2:4]
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-5)


def test_scatter_tokens_inverts_masked_select():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    vals = torch.tensor([1.0, 2.0, 3.0])
    out = scatter_tokens(vals, mask)
    assert out.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    assert torch.equal(out[mask.bool()], vals)


def test_chunks_shrink_with_the_vocabulary_so_big_vocabularies_fit():
    from opd.logprobs import MAX_CHUNK_LOGITS_BYTES, positions_per_chunk

    class Head:
        def __init__(self, vocab):
            self.weight = torch.empty(vocab, 1)

    class Model:
        def __init__(self, vocab):
            self.head = Head(vocab)

        def get_output_embeddings(self):
            return self.head

    assert positions_per_chunk(Model(100), 1024) == 1024  # small vocabularies keep the configured chunk
    assert positions_per_chunk(Model(262144), 1024) == MAX_CHUNK_LOGITS_BYTES // (4 * 262144) == 128
    assert positions_per_chunk(Model(10**9), 1024) == 1  # never zero


def _ragged_batch(tokenizer, prompts, lengths):
    """Left-padded prompts and right-padded completions of the given real lengths (what the sampler writes)."""
    from opd.rollout import encode_prompts

    ids, mask = encode_prompts(tokenizer, prompts, 256)
    g = torch.Generator().manual_seed(5)
    comp = torch.randint(3, len(tokenizer), (len(prompts), max(lengths)), generator=g)
    cmask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask, comp.masked_fill(cmask == 0, tokenizer.pad_token_id), cmask


def _hf_completion_hidden(model, prompt_ids, prompt_mask, comp, cmask):
    """Reference: HF over the padded batch with the full attention mask and cumsum positions."""
    from opd.logprobs import sequence_inputs

    ids, attn, pos = sequence_inputs(prompt_ids, prompt_mask, comp, cmask)
    h = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    P, T = prompt_ids.shape[1], comp.shape[1]
    return h[:, P - 1 : P - 1 + T][cmask.bool()]


def test_left_aligned_rows_hold_each_sequence_from_position_zero(tokenizer, prompts):
    from opd.logprobs import left_aligned

    p_ids, p_mask, comp, cmask = _ragged_batch(tokenizer, prompts[:3], [4, 1, 6])
    ids, rows, at = left_aligned(p_ids, p_mask, comp, cmask)
    for b in range(3):
        seq = p_ids[b][p_mask[b].bool()].tolist() + comp[b][cmask[b].bool()].tolist()
        assert ids[b, : len(seq)].tolist() == seq
    # ids[rows, at + 1] is the completion token each state predicts.
    assert torch.equal(ids[rows, at + 1], comp[cmask.bool()])
    # A mask with a hole (or an empty prompt) is not a left/right padded batch.
    holed = cmask.clone()
    holed[2, 1] = 0
    assert left_aligned(p_ids, p_mask, comp, holed) is None
    empty = p_mask.clone()
    empty[0] = 0
    assert left_aligned(p_ids, empty, comp, cmask) is None


def test_rows_padded_to_a_multiple_of_positions_give_the_same_states(student, tokenizer, prompts, monkeypatch):
    """matmul.position_multiple pads the left-aligned rows (bf16 on AMX CPUs): the same ids in front, padding
    after, and the same completion states (causal attention: no real position sees the padding)."""
    from opd import matmul
    from opd.logprobs import completion_hidden, left_aligned

    batch = _ragged_batch(tokenizer, prompts[:3], [4, 1, 6])
    ids, rows, at = left_aligned(*batch)
    padded, rows16, at16 = left_aligned(*batch, multiple=16)
    assert padded.shape[1] % 16 == 0 and padded.shape[1] > ids.shape[1]
    assert torch.equal(padded[:, : ids.shape[1]], ids) and torch.equal(rows16, rows) and torch.equal(at16, at)
    assert left_aligned(*batch, multiple=16, most=ids.shape[1] + 1)[0].shape == ids.shape  # not past the model's limit
    with torch.no_grad():
        want = completion_hidden(student, *batch)
        monkeypatch.setattr(matmul, "position_multiple", lambda param: 16)
        torch.testing.assert_close(completion_hidden(student, *batch), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(completion_hidden(student, *batch, fast=False), want, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    assert matmul.position_multiple(torch.zeros(1)) == 1  # fp32: never padded
    assert matmul.position_multiple(bf16) == (16 if "amx_bf16" in matmul.cpu_flags() else 1)


def test_completion_hidden_fast_and_hf_paths_equal_the_masked_forward(student, tokenizer, prompts):
    from tests.rollout.test_fast_llama import gqa_model

    for model in (student, gqa_model(tokenizer)):
        batch = _ragged_batch(tokenizer, prompts, [5, 1, 7, 3, 7, 2, 6, 4][: len(prompts)])
        with torch.no_grad():
            want = _hf_completion_hidden(model, *batch)
            fast = completion_hidden(model, *batch)  # opd.llama under no_grad
            hf = completion_hidden(model, *batch, fast=False)  # HF over the left-aligned rows, no mask
        torch.testing.assert_close(fast, want, rtol=0, atol=2e-5)
        torch.testing.assert_close(hf, want, rtol=0, atol=2e-5)
    # With grad (the update) the HF model runs, so the gradient reaches every weight.
    student.zero_grad()
    completion_hidden(student, *batch).sum().backward()
    assert all(p.grad is not None for p in student.parameters())


def test_the_fp32_forwards_mlp_in_chunks_of_rows_equals_the_masked_forward(student, tokenizer, prompts, monkeypatch):
    from opd import llama

    batch = _ragged_batch(tokenizer, prompts, [5, 1, 7, 3, 7, 2, 6, 4][: len(prompts)])
    monkeypatch.setattr(llama, "MLP_CHUNK_ROWS", 24)  # the rows in several chunks and a short last one
    calls = []
    real = llama.silu_mul
    monkeypatch.setattr(llama, "silu_mul", lambda g: calls.append(g.shape[0]) or real(g))
    with torch.no_grad():
        want = _hf_completion_hidden(student, *batch)
        fast = completion_hidden(student, *batch)
    layers = student.config.num_hidden_layers
    assert len(calls) > layers and max(calls) == 24 and sum(calls) % layers == 0 and sum(calls) // layers % 24
    torch.testing.assert_close(fast, want, rtol=0, atol=2e-5)


def test_completion_hidden_falls_back_to_the_masked_forward_for_a_mask_with_holes(student, tokenizer, prompts):
    p_ids, p_mask, comp, cmask = _ragged_batch(tokenizer, prompts[:3], [4, 2, 6])
    cmask[2, 1] = 0
    with torch.no_grad():
        torch.testing.assert_close(completion_hidden(student, p_ids, p_mask, comp, cmask),
                                   _hf_completion_hidden(student, p_ids, p_mask, comp, cmask), rtol=0, atol=0)


def test_fast_path_in_bf16_stays_close_to_hf_in_bf16(tokenizer, prompts):
    from tests.rollout.test_fast_llama import gqa_model

    model = gqa_model(tokenizer).to(torch.bfloat16).float()  # fp32 holding bf16-rounded weights: the reference
    batch = _ragged_batch(tokenizer, prompts, [5, 1, 7, 3, 7, 2, 6, 4][: len(prompts)])
    with torch.no_grad():
        want = _hf_completion_hidden(model, *batch)
        fast = completion_hidden(model.to(torch.bfloat16), *batch).float()
    assert (fast - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("checkpoint_above", [0, 2**40])
def test_chunk_gradients_are_the_same_recomputed_or_kept(student, monkeypatch, checkpoint_above):
    import opd.logprobs as lp_mod

    monkeypatch.setattr(lp_mod, "CHECKPOINT_ABOVE_BYTES", checkpoint_above)
    h = _hidden(student).requires_grad_(True)
    targets = torch.randint(0, student.config.vocab_size, (h.shape[0],))
    full = F.log_softmax(lm_logits(student, h, 1.0), dim=-1).gather(1, targets[:, None]).sum()
    (g_full,) = torch.autograd.grad(full, h)
    calls = []
    real_head = lp_mod.lm_logits
    monkeypatch.setattr(lp_mod, "lm_logits", lambda *a: calls.append(1) or real_head(*a))
    (lp,) = per_position(student, h, lambda logp, sl: (logp.gather(1, targets[sl, None]).squeeze(1),), 1.0, 4)
    (g_chunk,) = torch.autograd.grad(lp.sum(), h)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-6)
    chunks = -(-h.shape[0] // 4)
    assert len(calls) == (2 * chunks if checkpoint_above == 0 else chunks)  # recomputed in the backward, or kept
