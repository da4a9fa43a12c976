"""Student initialisation: layer-dropped copies of a model; model specs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config import ConfigError, StudentConfig
from opd.models import drop_layers, load_student
from opd.rollout import SamplingParams, sample
from tests.conftest import tiny_model


def test_drop_layers_keeps_every_kth_layer_and_round_trips(tokenizer, tmp_path, prompts):
    full = tiny_model(tokenizer, 0, num_hidden_layers=5)
    small = drop_layers(full, 2)
    assert small.config.num_hidden_layers == 3 and len(small.model.layers) == 3
    for new, old in enumerate([0, 2, 4]):
        a, b = small.model.layers[new].state_dict(), full.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    assert torch.equal(small.model.embed_tokens.weight, full.model.embed_tokens.weight)
    # Its output is the output of the kept layers run in sequence: check against a hand-made pass.
    ids = torch.tensor([tokenizer("12+345=")["input_ids"]])
    with torch.no_grad():
        got = small(input_ids=ids).logits
        h = full.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = full.model.rotary_emb(h, pos)
        for i in (0, 2, 4):
            h = full.model.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=rope)
            h = h[0] if isinstance(h, tuple) else h
        want = full.lm_head(full.model.norm(h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    small.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, got)
    # KV-cache sampling works at the new depth.
    roll = sample(small, tokenizer, prompts, SamplingParams(max_new_tokens=5), generator=torch.Generator().manual_seed(0))
    assert roll.completion_ids.shape[0] == len(prompts)


def test_drop_layers_refuses_a_stride_beyond_the_depth(tokenizer):
    with pytest.raises(ConfigError, match="keep_every = 9"):
        drop_layers(tiny_model(tokenizer, 0, num_hidden_layers=2), 9)


def test_load_student_applies_drop_layers_and_lora(tmp_path):
    cfg = StudentConfig(model="builtin:arith-teacher", init="drop_layers", keep_every=2, lora_rank=2,
                        lora_target_modules=["q_proj"], device="cpu")
    model = load_student(cfg, seed=0)
    assert model.config.num_hidden_layers == 2
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
