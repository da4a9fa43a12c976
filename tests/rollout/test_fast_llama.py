import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.rollout import SamplingCopy, SamplingParams, encode_prompts, sample
from opd.rollout.fast_llama import FastLlamaDecoder, build_decoder, unsupported_reason
from opd.rollout.sampler import HFDecoder, make_decoder

from tests.rollout.test_sampler import recompute


def gqa_model(tokenizer, seed: int = 3, **extra) -> LlamaForCausalLM:
    """A small random Llama unlike the built-in one: grouped-query attention, untied LM head, explicit head_dim."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    return LlamaForCausalLM(config).eval()


def decode_both(model, tokenizer, prompts, steps: int, atol: float):
    """Run HF and the fast decoder side by side over the same left-padded batch, feeding both the same tokens."""
    ids, prompt_mask = encode_prompts(tokenizer, prompts, 256)
    B, P = ids.shape
    full = torch.ones((B, P + steps), dtype=torch.long)
    full[:, :P] = prompt_mask
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    hf, fast = HFDecoder(model), build_decoder(model, B, P + steps)
    assert isinstance(fast, FastLlamaDecoder)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        want, got = hf.prefill(ids, prompt_mask, pos), fast.prefill(ids, prompt_mask, pos)
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        pos = pos[:, -1:] + 1
        for t in range(steps):
            tok = torch.multinomial(want.float().softmax(-1), 1, generator=gen).squeeze(1)  # sampled, not greedy
            attn = full[:, : P + t + 1]
            want, got = hf.step(tok, attn, pos), fast.step(tok, attn, pos)
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"decode step {t}: {m}")
            pos = pos + 1


def test_fast_decoder_logits_equal_hf_on_the_builtin_student(student, tokenizer, prompts):
    # Prompts of 3 to 10 characters: every row but the longest is left-padded.
    decode_both(student, tokenizer, prompts, steps=12, atol=1e-5)


def test_fast_decoder_logits_equal_hf_with_gqa_and_an_untied_head(tokenizer, prompts):
    model = gqa_model(tokenizer)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    decode_both(model, tokenizer, prompts, steps=12, atol=1e-5)


def test_fast_decoder_handles_llama3_rope_scaling(tokenizer, prompts):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = gqa_model(tokenizer, rope_parameters=rope)
    assert unsupported_reason(model) is None
    decode_both(model, tokenizer, prompts, steps=8, atol=1e-5)


def test_fast_decoder_sees_the_current_weights(student, tokenizer, prompts):
    # Built at the start of every rollout: a training step in between must show up in its logits.
    decode_both(student, tokenizer, prompts[:2], steps=2, atol=1e-5)
    with torch.no_grad():
        student.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        student.model.layers[1].mlp.up_proj.weight.add_(0.1)
    decode_both(student, tokenizer, prompts[:2], steps=2, atol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sample_auto_and_hf_decoders_agree(student, tokenizer, prompts, temperature, top_p):
    rolls = {kind: sample(student, tokenizer, prompts, SamplingParams(temperature, top_p, 16, decoder=kind),
                          generator=torch.Generator().manual_seed(4)) for kind in ("auto", "hf")}
    fast, hf = rolls["auto"], rolls["hf"]
    assert torch.equal(fast.completion_ids, hf.completion_ids) and torch.equal(fast.completion_mask, hf.completion_mask)
    torch.testing.assert_close(fast.behaviour_logprobs, hf.behaviour_logprobs, rtol=0, atol=1e-5)
    with torch.no_grad():
        lp = recompute(student, fast) if temperature == 1.0 and top_p == 1.0 else None
    if lp is not None:  # and both equal a full forward over prompt + completion
        torch.testing.assert_close(lp, fast.behaviour_logprobs[fast.completion_mask.bool()], rtol=0, atol=5e-5)


def test_unsupported_models_fall_back_to_hf_and_still_sample(student, tokenizer, prompts):
    from opd.lora import add_lora

    dynamic = gqa_model(tokenizer, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    biased = gqa_model(tokenizer, attention_bias=True)
    lora = add_lora(student, rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    for model, why in ((dynamic, "rope_type"), (biased, "bias"), (lora, "adapter")):
        assert why in unsupported_reason(model).lower()
        assert isinstance(make_decoder(model, "auto", 2, 8), HFDecoder)
        roll = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            lp = recompute(model, roll)
        torch.testing.assert_close(lp, roll.behaviour_logprobs[roll.completion_mask.bool()], rtol=0, atol=5e-5)


def test_decoder_choice(student):
    assert isinstance(make_decoder(student, "auto", 2, 8), FastLlamaDecoder)
    assert isinstance(make_decoder(student, "hf", 2, 8), HFDecoder)
    with pytest.raises(ValueError, match="auto"):
        make_decoder(student, "fast", 2, 8)


def test_bf16_sampling_copy_uses_the_fast_decoder(student, tokenizer, prompts):
    model = SamplingCopy(student, torch.bfloat16).refresh(student)
    dec = make_decoder(model, "auto", len(prompts), 32)
    assert isinstance(dec, FastLlamaDecoder) and dec.layers[0].qkv.dtype == torch.bfloat16
    # Same bf16 arithmetic as HF up to the order of a few bf16 operations.
    decode_both(model, tokenizer, prompts, steps=8, atol=5e-2)
    roll = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = recompute(student, roll)  # the fp32 student recomputes: bf16 rounding apart, the same distribution
    diff = (lp - roll.behaviour_logprobs[roll.completion_mask.bool()]).abs()
    assert diff.max() < 0.2 and diff.mean() < 0.05


def test_guided_rollout_is_the_same_with_both_decoders(student, teacher_model, tokenizer, prompts):
    # The teacher of a guided rollout goes through the same decoder choice (it is a Llama here: the fast one).
    from opd.rollout.guidance import TeacherGuide

    rolls = [sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=12, decoder=kind),
                    generator=torch.Generator().manual_seed(3), guide=TeacherGuide(teacher_model, mix=0.5))
             for kind in ("auto", "hf")]
    assert torch.equal(rolls[0].completion_ids, rolls[1].completion_ids)
    for key in ("behaviour_logprobs", "student_logprobs", "teacher_share"):
        torch.testing.assert_close(getattr(rolls[0], key), getattr(rolls[1], key), rtol=0, atol=1e-5)


def test_a_model_training_with_attention_dropout_is_refused(tokenizer):
    model = gqa_model(tokenizer, attention_dropout=0.1)
    assert unsupported_reason(model) is None  # in eval mode dropout is off: supported
    model.train()
    assert "dropout" in unsupported_reason(model)
    assert isinstance(make_decoder(model, "auto", 2, 8), HFDecoder)


def test_fused_weights_are_reused_until_a_weight_changes(student):
    a = build_decoder(student, 2, 8).layers[0]
    b = build_decoder(student, 2, 8).layers[0]
    assert a.qkv is b.qkv  # nothing changed: no copy
    with torch.no_grad():
        student.model.layers[0].mlp.gate_proj.weight.add_(1.0)  # what an optimizer step does (in place)
    c = build_decoder(student, 2, 8).layers[0]
    assert c.gate_up.data_ptr() == a.gate_up.data_ptr()  # refilled in place
    torch.testing.assert_close(c.gate_up[: c.gate_up.shape[0] // 2], student.model.layers[0].mlp.gate_proj.weight, rtol=0, atol=0)
    copy = SamplingCopy(student, torch.bfloat16)
    d = build_decoder(copy.refresh(student), 2, 8).layers[0]
    assert d.qkv.dtype == torch.bfloat16 and d.qkv.data_ptr() != a.qkv.data_ptr()  # per model


def test_a_sampling_copys_fused_weights_are_its_own_storage(tokenizer, prompts):
    from opd.llama import fuse_storage

    model = gqa_model(tokenizer)
    copy = SamplingCopy(model, torch.bfloat16)  # fuse_storage: Q, K, V (and gate, up) one after another
    policy = copy.refresh(model)
    att, mlp = policy.model.layers[1].self_attn, policy.model.layers[1].mlp
    layer = build_decoder(policy, 2, 8).layers[1]
    assert layer.qkv.data_ptr() == att.q_proj.weight.data_ptr()  # a view: nothing concatenated
    assert layer.gate_up.data_ptr() == mlp.gate_proj.weight.data_ptr()
    assert torch.equal(layer.qkv, torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    assert all(torch.equal(a, b.detach().bfloat16()) for a, b in zip(policy.parameters(), model.parameters()))
    with torch.no_grad():
        att.v_proj.weight.add_(1.0)  # a write into one part is what the fused weight holds
    assert torch.equal(build_decoder(policy, 2, 8).layers[1].qkv[-att.v_proj.weight.shape[0]:], att.v_proj.weight)
    assert fuse_storage(policy) == 0  # already so
    # the copy samples as the model it was made from (fused views or not: the same arithmetic)
    params = SamplingParams(max_new_tokens=6)
    plain = copy_of_plain = model.to(torch.bfloat16)
    with torch.no_grad():
        att_plain = plain.model.layers[1].self_attn
        att_plain.v_proj.weight.add_(1.0)
    a = sample(policy, tokenizer, prompts, params, generator=torch.Generator().manual_seed(2))
    b = sample(copy_of_plain, tokenizer, prompts, params, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_int8_rows_are_handed_out_only_where_each_source_has_its_own(tokenizer):
    from opd import cpu_kernels, llama

    if not cpu_kernels.int8_gemv_available():
        pytest.skip("opd's int8 kernel (fp32 scales) does not build here")
    model = gqa_model(tokenizer).to(torch.bfloat16)  # not a sampling copy: its fused weights are concatenations
    build_decoder(model, 2, 8, int8=True)
    att = model.model.layers[0].self_attn
    rows = llama.int8_rows(model, [att.o_proj.weight])  # quantised from the weight itself
    assert rows is not None and torch.equal(rows[0][0], llama.quantize_int8(att.o_proj.weight).q)
    assert llama.int8_rows(model, [att.o_proj.weight, att.q_proj.weight]) is None  # q: from the concatenated QKV
    policy = SamplingCopy(model, torch.bfloat16).refresh(model)  # Q, K, V in one buffer: their own rows
    build_decoder(policy, 2, 8, int8=True)
    k = policy.model.layers[0].self_attn.k_proj.weight
    rows = llama.int8_rows(policy, [k])
    assert rows is not None and torch.equal(rows[0][0], llama.quantize_int8(k).q)


def test_int8_weights_round_to_the_nearest_step_of_each_channel():
    from opd.llama import quantize_int8

    torch.manual_seed(0)
    w = (torch.randn(2500, 24) * torch.logspace(-3, 1, 2500)[:, None]).to(torch.bfloat16)  # rows of very different scale
    q = quantize_int8(w, rows=1000)  # blocks of rows, the last one partial
    deq = q.q.float() * q.scale.float()[:, None]
    assert q.q.dtype == torch.int8 and q.q.abs().max() == 127
    step = q.scale.float()[:, None]
    # Within half a step (the largest entry may clamp at 127 by the bf16 rounding of its scale: 127 x 2^-8 of a step).
    assert ((deq - w.float()).abs() <= step * (0.5 + 127 * 2**-8) + 1e-7).all()
    assert ((deq - w.float()).abs() <= 0.5 * step * (1 + 1e-3)).float().mean() > 0.99
    again = quantize_int8(w * 2, out=q)  # refilled in place
    assert again.q.data_ptr() == q.q.data_ptr()


def test_int8_quantising_an_fp32_weight_leaves_it_alone():
    from opd.llama import int8_kernel_dtype, quantize_int8

    torch.manual_seed(0)
    w = torch.randn(300, 40)
    before = w.clone()
    q = quantize_int8(w, rows=128)
    assert torch.equal(w, before)  # fp32 blocks are copies, not views divided in place
    assert q.scale.dtype == int8_kernel_dtype(torch.float32)  # fp32 for opd's kernel, else bf16 for torch's
    deq = q.q.float() * q.scale.float()[:, None]
    assert ((deq - w).abs() <= q.scale.float()[:, None] * (0.5 + 127 * 2**-8) + 1e-7).all()


@pytest.mark.parametrize("dtype, kernel", [(torch.bfloat16, "torch"), (torch.bfloat16, "auto"), (torch.float32, "torch"),
                                           (torch.float32, "auto")])
def test_int8_decode_steps_equal_the_dequantised_model(tokenizer, prompts, dtype, kernel, fresh_kernel):
    """bf16 models run the int8 products in bf16 through torch's kernel, or in fp32 through opd's AVX-512 build
    ("auto" on such a CPU); fp32 models in fp32 through opd's kernel ("auto", where it builds) or, through
    torch's, with only those products' activations rounded to bf16."""
    from opd import cpu_kernels
    from opd.llama import int8_kernel_dtype, int8_linear, quantize_int8

    fresh_kernel.setenv("OPD_INT8_KERNEL", kernel)
    if kernel == "auto" and not cpu_kernels.int8_gemv_available():
        pytest.skip("opd's int8 kernel does not build here")
    exact = dtype == torch.float32 and kernel == "auto"

    model = gqa_model(tokenizer).to(dtype)
    ids, prompt_mask = encode_prompts(tokenizer, prompts, 256)
    B, P = ids.shape
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    full = torch.ones((B, P + 6), dtype=torch.long)
    full[:, :P] = prompt_mask
    int8 = build_decoder(model, B, P + 6, int8=True)
    assert int8.int8 is not None
    # The reference: the same model with every matmul weight replaced by its dequantised int8 copy, through HF.
    ref_model = gqa_model(tokenizer).to(dtype)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if p.dim() == 2 and "embed_tokens" not in name:
                q = quantize_int8(p)
                p.copy_((q.q.float() * q.scale.float()[:, None]).to(p.dtype))
        # The prefill keeps the model's own weights in its layers (so does the reference's cache of the prompt);
        # its last positions go through the int8 head, as every decode step's.
        plain = HFDecoder(model)
        want = plain.prefill(ids, prompt_mask, pos)
        int8_head = gqa_model(tokenizer).to(dtype)  # the model's layers, its head dequantised
        int8_head.lm_head.weight.copy_(ref_model.lm_head.weight)
        got = int8.prefill(ids, prompt_mask, pos)
        assert got.dtype == (torch.float32 if int8_kernel_dtype(dtype) == torch.float32 else dtype)
        torch.testing.assert_close(got.float(), HFDecoder(int8_head).prefill(ids, prompt_mask, pos).float(), rtol=0,
                                   atol=1e-4 if exact else 0.06)
        ref = HFDecoder(ref_model)
        ref.cache = plain.cache
        own = build_decoder(model, B, P + 6)
        own.prefill(ids, prompt_mask, pos)
        pos = pos[:, -1:] + 1
        gen = torch.Generator().manual_seed(0)
        for t in range(6):
            tok = torch.multinomial(want.float().softmax(-1), 1, generator=gen).squeeze(1)
            attn = full[:, : P + t + 1]
            want, got = ref.step(tok, attn, pos), int8.step(tok, attn, pos)
            # decode steps run in the int8 products' activation dtype: fp32 through opd's kernel
            assert got.dtype == (torch.float32 if int8_kernel_dtype(dtype) == torch.float32 else dtype)
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-4 if exact else 0.06,
                                       msg=lambda m: f"step {t}: {m}")
            # and not simply the model's own weights: the int8 rounding shows against the same decoder without it
            assert (own.step(tok, attn, pos).float() - got.float()).abs().max() > 1e-3
            pos = pos + 1
    # The kernel itself: x @ (q * scale).T, in the activations' dtype.
    x = torch.randn(3, 48).to(dtype)
    q = quantize_int8(model.model.layers[0].mlp.up_proj.weight)
    y = int8_linear(x, q)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), x.float() @ (q.q.float() * q.scale.float()[:, None]).T, rtol=2e-2, atol=2e-2)


def test_int8_sampling_falls_back_where_it_cannot_run(student, tokenizer, prompts):
    from opd.rollout import int8_decode_unsupported

    bf16 = SamplingCopy(student, torch.bfloat16).refresh(student)
    assert int8_decode_unsupported(bf16, "auto") is None
    assert int8_decode_unsupported(student, "auto") is None  # fp32: bf16-rounded activations in the int8 products
    assert "hf" in int8_decode_unsupported(bf16, "hf")
    fp16 = SamplingCopy(student, torch.float16).refresh(student)
    assert "kernel" in int8_decode_unsupported(fp16, "auto")  # torch's CPU kernel: fp32 / bf16 only
    # An fp16 model asked for int8 decodes as before (the decoder keeps its own weights).
    plain = sample(fp16, tokenizer, prompts, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(1))
    asked = sample(fp16, tokenizer, prompts, SamplingParams(max_new_tokens=6, int8=True),
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.completion_ids, asked.completion_ids)
    # The fp32 student and a bf16 copy sample through the int8 weights: close to, not equal to, their own logprobs.
    for model in (student, bf16):
        own = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(1))
        r8 = sample(model, tokenizer, prompts, SamplingParams(max_new_tokens=6, int8=True),
                    generator=torch.Generator().manual_seed(1))
        assert r8.num_tokens > 0 and torch.isfinite(r8.behaviour_logprobs).all()
        # The first token comes from the prefill, whose layers keep the model's own weights and whose head is the
        # int8 one (as every step's); the second from an int8 step.
        assert torch.equal(own.completion_ids[:, 0], r8.completion_ids[:, 0])
        first = (r8.behaviour_logprobs[:, 0] - own.behaviour_logprobs[:, 0]).abs()
        assert first.max() < 0.05 and first.max() > 0
        same = own.completion_ids[:, 1] == r8.completion_ids[:, 1]
        drift = (own.behaviour_logprobs[same, 1] - r8.behaviour_logprobs[same, 1]).abs()
        assert same.any() and drift.max() < 0.5 and drift.max() > 0


@pytest.mark.parametrize("lacks_bf16", [True, False])
def test_int8_sampling_prefills_in_the_fast_dtype_of_the_cpu(student, monkeypatch, lacks_bf16):
    """rollout.dtype = 'int8': a bf16 copy prefills where the CPU has bf16 instructions; the fp32 student itself
    where it has none (a bf16 prefill there is many times slower than fp32)."""
    from opd import matmul
    from opd.rollout import sampling_copy_for

    monkeypatch.setattr(matmul, "cpu_lacks_bf16", lambda: lacks_bf16)
    copy = sampling_copy_for(student, "int8")
    if lacks_bf16:
        assert copy is None
    else:
        assert next(copy.model.parameters()).dtype == torch.bfloat16
    assert next(sampling_copy_for(student, "bfloat16").model.parameters()).dtype == torch.bfloat16  # asked for
    assert sampling_copy_for(student, "same") is None


@pytest.mark.parametrize("dtype, kernel, which, rows", [(torch.float32, "auto", "gqa", None), (torch.float32, "avx2", "gqa", None),
                                                       (torch.float32, "avx512", "gqa", None),
                                                       (torch.bfloat16, "auto", "gqa", None), (torch.float32, "auto", "builtin", 1),
                                                       (torch.float32, "auto", "builtin", 5)])
def test_native_int8_steps_equal_the_torch_ops(student, tokenizer, prompts, dtype, kernel, which, rows, fresh_kernel):
    """The whole-step C kernel (csrc/decode_step.c) against the decoder's own torch ops over the same int8 weights
    and cache: left-padded rows, grouped-query attention, sizes that are not multiples of the vector width; with
    the products of each build of the int8 kernel the CPU runs ("auto": VNNI where it has it); and the built-in
    student (no GQA) at batch 1 and at a batch of 5 (one full and one partial group of 4 rows in the products)."""
    from opd import cpu_kernels

    fresh_kernel.setenv("OPD_INT8_KERNEL", kernel)
    if not cpu_kernels.int8_gemv_available():
        pytest.skip("opd's int8 kernel does not build here")
    if kernel == "avx512" and cpu_kernels.variant() != "avx512":
        pytest.skip("no AVX-512 on this CPU")
    model = gqa_model(tokenizer).to(dtype) if which == "gqa" else student
    ids, prompt_mask = encode_prompts(tokenizer, (prompts * 2)[:rows] if rows else prompts, 256)
    B, P = ids.shape
    assert B == 1 or (prompt_mask == 0).any()  # some rows are left-padded
    steps = 7
    full = torch.ones((B, P + steps), dtype=torch.long)
    full[:, :P] = prompt_mask
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    native = FastLlamaDecoder(model, B, P + steps, int8=True)
    ops = FastLlamaDecoder(model, B, P + steps, int8=True, native=False)
    if native.step_dtype != torch.float32:
        pytest.skip("a bf16 model's int8 products run in bf16 here (no AVX-512 build): no native step")
    assert native.native is not None and ops.native is None
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        want, got = ops.prefill(ids, prompt_mask, pos), native.prefill(ids, prompt_mask, pos)
        pos = pos[:, -1:] + 1
        for t in range(steps):
            tok = torch.multinomial(want.float().softmax(-1), 1, generator=gen).squeeze(1)
            attn = full[:, : P + t + 1]
            want, got = ops.step(tok, attn, pos), native.step(tok, attn, pos)
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=lambda m: f"step {t}: {m}")
            pos = pos + 1
        # the native step wrote the same keys and values into the shared cache layout
        torch.testing.assert_close(native.cache, ops.cache, rtol=0, atol=2e-5)


def test_native_step_refuses_what_would_read_outside_its_buffers(tokenizer):
    from opd import cpu_kernels

    if not cpu_kernels.int8_gemv_available():
        pytest.skip("opd's int8 kernel does not build here")
    model = gqa_model(tokenizer)
    dec = FastLlamaDecoder(model, 2, 6, int8=True)
    assert dec.native is not None
    ids, mask = torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.long)
    dec.prefill(ids, mask, torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(IndexError, match="outside the embedding"):
        dec.step(torch.tensor([5, len(tokenizer) + 3]), torch.ones(2, 3, dtype=torch.long), torch.tensor([[2], [2]]))
    with pytest.raises(IndexError, match="RoPE table"):
        dec.step(torch.tensor([5, 6]), torch.ones(2, 3, dtype=torch.long), torch.tensor([[2], [9]]))
    with pytest.raises(ValueError, match="must cover every cached position"):
        dec.step(torch.tensor([5, 6]), torch.ones(2, 5, dtype=torch.long), torch.tensor([[2], [2]]))
    assert dec.step(torch.tensor([5, 6]), torch.ones(2, 3, dtype=torch.long), torch.tensor([[2], [2]])).shape == (2, len(tokenizer))


def test_an_int8_decoder_prefills_a_one_token_prompt_with_the_models_own_weights():
    # A forward of length 1 was taken for a decode step: a 1-token prompt's prefill read the int8 weights.
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.rollout.fast_llama import build_decoder

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=32, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (1, 1))
    with torch.no_grad():
        int8, plain = build_decoder(model, 1, 3, int8=True), build_decoder(model, 1, 3)
        for d in (int8, plain):
            d.prefill(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert torch.equal(int8.cache[:, :, :, :, :1], plain.cache[:, :, :, :, :1])
