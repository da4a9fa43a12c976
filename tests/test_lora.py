"""LoRA: only adapters train, exports are merged plain models that transformers loads, adapters resume exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.config import ConfigError
from opd.lora import adapter_state, add_lora, has_lora, load_adapter_state, merged_copy, save_plain
from tests.conftest import tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _train_adapters(model, tokenizer, steps=3):
    ids = torch.tensor([tokenizer("12+345=357")["input_ids"]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ids


def test_only_adapters_train_and_the_export_is_the_merged_model(tokenizer, tmp_path):
    base = tiny_model(tokenizer, 0)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, rank=4, alpha=8.0, target_modules=TARGETS)
    assert has_lora(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = _train_adapters(model, tokenizer)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_plain(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not has_lora(loaded) and set(loaded.state_dict()) == set(frozen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    # The adapters really changed the exported weights; the live model keeps its adapters.
    assert not torch.equal(loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           frozen["model.layers.0.self_attn.q_proj.weight"])
    assert has_lora(model) and merged_copy(model) is not model


def test_adapter_state_round_trips_onto_a_fresh_student(tokenizer):
    trained = add_lora(tiny_model(tokenizer, 0), rank=4, alpha=8.0, target_modules=TARGETS)
    ids = _train_adapters(trained, tokenizer)
    fresh = add_lora(tiny_model(tokenizer, 0), rank=4, alpha=8.0, target_modules=TARGETS)
    load_adapter_state(fresh, adapter_state(trained))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, trained.eval()(input_ids=ids).logits)
    other = add_lora(tiny_model(tokenizer, 0), rank=4, alpha=8.0, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="do not fit"):
        load_adapter_state(other, adapter_state(trained))


def test_unknown_target_module_names_the_real_ones(tokenizer):
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no module.*q_proj"):
        add_lora(tiny_model(tokenizer, 0), rank=4, alpha=8.0, target_modules=["q_proj", "qkv"])


def test_a_tied_lm_head_is_refused_as_a_target_and_an_untied_one_exports_exactly(tokenizer, tmp_path):
    # Merging an adapter into a tied LM head writes into the embedding it shares: the export would differ from the
    # model that was trained (measured: logits 3.7 apart on a tiny model). Untied, the head is an ordinary linear.
    tied = tiny_model(tokenizer, 0)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(ConfigError, match=r"\['lm_head'\] shares its weight with the input embedding"):
        add_lora(tied, rank=4, alpha=8.0, target_modules=["q_proj", "lm_head"])
    untied = tiny_model(tokenizer, 0)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    add_lora(untied, rank=4, alpha=8.0, target_modules=["q_proj", "lm_head"])
    ids = _train_adapters(untied, tokenizer)
    save_plain(merged_copy(untied), tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, untied(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_a_bf16_students_export_is_base_plus_delta_exactly(tokenizer, tmp_path):
    # Folded into bf16 weights, most of a small trained delta rounded away: the export was not the trained model.
    base = tiny_model(tokenizer, 0).to(torch.bfloat16)
    frozen = {k: v.float().clone() for k, v in base.state_dict().items()}
    model = add_lora(base, rank=4, alpha=8.0, target_modules=TARGETS)
    with torch.no_grad():  # a trained-looking adapter: small, as a few steps at a usual lr leave it
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p.float()).to(p.dtype) * 0.02)
    save_plain(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", torch_dtype="auto")
    assert next(loaded.parameters()).dtype == torch.float32
    plain = loaded.state_dict()
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.replace("base_model.model.", "") + ".weight"
            delta = (module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()) * module.scaling["default"]
            torch.testing.assert_close(plain[key] - frozen[key], delta, rtol=1e-5, atol=1e-6)
            assert ((frozen[key] + delta).to(torch.bfloat16).float() == frozen[key]).any()  # bf16 would lose some
            checked += 1
    assert checked > 0


def test_exported_weights_are_readable_as_the_umask_allows(tokenizer, tmp_path):
    # safetensors creates its files 0600: a server running as another user could not read final/
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_plain(tiny_model(tokenizer, 0), tmp_path / "export")
    finally:
        os.umask(old)
    modes = [stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "export").glob("*.safetensors")]
    assert modes and all(m == 0o644 for m in modes)
