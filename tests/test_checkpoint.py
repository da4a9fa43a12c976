"""Checkpoints: save / latest / load round trip, pruning, and damaged checkpoints skipped with a warning."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from opd.checkpoint import (
    MANIFEST,
    STATE,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from opd.models import build_char_tokenizer
from opd.teacher.builtin import STUDENT_SHAPE, llama_config


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def make_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tok, STUDENT_SHAPE)).eval()


def state_for(step: int) -> dict:
    return {"step": step, "prompts": {"draws": {"arith": 4 * step}}, "rng": torch.get_rng_state(), "version": step}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def save_steps(run_dir, tok, steps, keep=10):
    models = {}
    for step in steps:
        models[step] = make_model(tok, seed=step)
        save_checkpoint(run_dir, step, models[step], tok, state_for(step), keep=keep)
    return models


def test_round_trip(tmp_path, tok):
    model = make_model(tok, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 5, 6]]), labels=torch.tensor([[1, 5, 6]])).loss.backward()
    optimizer.step()
    state = {"step": 7, "optimizer": optimizer.state_dict(), "prompts": {"draws": {"arith": 28}}, "rng": torch.get_rng_state()}
    path = save_checkpoint(tmp_path, 7, model, tok, state)
    assert path == tmp_path / "checkpoints" / "step-7"
    assert latest_checkpoint(tmp_path) == path
    assert verify_checkpoint(path) is None

    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(loaded, LlamaForCausalLM)
    assert_same_weights(model, loaded)
    ids = torch.tensor([[1, 10, 20, 30]])
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)

    back = load_trainer_state(path)
    assert back["step"] == 7 and back["prompts"] == {"draws": {"arith": 28}}
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for k, v in optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def test_checkpoint_folder_is_a_transformers_model_folder(tmp_path, tok):
    path = save_checkpoint(tmp_path, 1, make_model(tok), tok, state_for(1))
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", STATE, MANIFEST} <= names
    assert not any(n.endswith(".bin") for n in names)  # safetensors only
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == names - {MANIFEST}
    loaded_tok = AutoTokenizer.from_pretrained(path)
    assert loaded_tok("12+34=")["input_ids"] == tok("12+34=")["input_ids"]
    assert loaded_tok.eos_token == tok.eos_token and loaded_tok.pad_token == tok.pad_token


def test_latest_is_the_highest_step_not_the_last_written(tmp_path, tok):
    save_steps(tmp_path, tok, [10, 2, 9])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-9", "step-10"]
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_no_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_keep_prunes_older_checkpoints(tmp_path, tok):
    save_steps(tmp_path, tok, [1, 2, 3, 4], keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert not (tmp_path / "checkpoints" / "step-1").exists()
    save_checkpoint(tmp_path, 5, make_model(tok), tok, state_for(5), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-5"]


def test_saving_the_same_step_again_replaces_it(tmp_path, tok):
    save_checkpoint(tmp_path, 3, make_model(tok, seed=1), tok, state_for(3))
    second = make_model(tok, seed=2)
    path = save_checkpoint(tmp_path, 3, second, tok, {"step": 3, "tag": "second"})
    assert verify_checkpoint(path) is None
    assert load_trainer_state(path)["tag"] == "second"
    assert_same_weights(second, AutoModelForCausalLM.from_pretrained(path))


def test_leftover_tmp_folder_is_ignored(tmp_path, tok):
    models = save_steps(tmp_path, tok, [1])
    tmp = tmp_path / "checkpoints" / ".tmp-step-2"  # a crash while writing step 2
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half written")
    warnings: list[str] = []
    path = latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step-1" and warnings == []
    assert_same_weights(models[1], AutoModelForCausalLM.from_pretrained(path))
    # and the next save of that step clears the leftover
    save_checkpoint(tmp_path, 2, make_model(tok), tok, state_for(2))
    assert not tmp.exists() and latest_checkpoint(tmp_path).name == "step-2"


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_weights_fall_back_to_the_previous_checkpoint(tmp_path, tok):
    models = save_steps(tmp_path, tok, [1, 2])
    _flip_bytes(tmp_path / "checkpoints" / "step-2" / "model.safetensors")
    warnings: list[str] = []
    path = latest_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step-1"
    assert len(warnings) == 1
    assert "step-2" in warnings[0] and "checksum mismatch in model.safetensors" in warnings[0]
    assert_same_weights(models[1], AutoModelForCausalLM.from_pretrained(path))
    assert load_trainer_state(path)["step"] == 1


def test_missing_manifest_falls_back(tmp_path, tok):
    save_steps(tmp_path, tok, [1, 2, 3])
    (tmp_path / "checkpoints" / "step-3" / MANIFEST).unlink()
    _flip_bytes(tmp_path / "checkpoints" / "step-2" / STATE)
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).name == "step-1"
    assert len(warnings) == 2
    assert "step-3" in warnings[0] and "no manifest" in warnings[0]
    assert "step-2" in warnings[1] and f"checksum mismatch in {STATE}" in warnings[1]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: (p / STATE).unlink(), f"missing {STATE}"),
        (lambda p: (p / MANIFEST).write_text("{not json"), "unreadable manifest"),
        (lambda p: (p / MANIFEST).write_text('{"step": 2}'), "unreadable manifest"),
        (lambda p: (p / "config.json").write_text("{}"), "checksum mismatch in config.json"),
    ],
)
def test_other_damage_is_reported(tmp_path, tok, damage, problem):
    save_steps(tmp_path, tok, [1, 2])
    damage(tmp_path / "checkpoints" / "step-2")
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-2") == problem
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warn=warnings.append).name == "step-1"
    assert len(warnings) == 1 and problem in warnings[0]


def test_all_damaged_gives_none(tmp_path, tok):
    save_steps(tmp_path, tok, [1])
    _flip_bytes(tmp_path / "checkpoints" / "step-1" / "model.safetensors")
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) is None
    assert len(warnings) == 1


def test_unrelated_folders_are_not_checkpoints(tmp_path, tok):
    save_steps(tmp_path, tok, [1])
    for name in ("step-x", "final", "step-", "old-step-5"):
        (tmp_path / "checkpoints" / name).mkdir()
    (tmp_path / "checkpoints" / "step-9").write_text("a file, not a folder")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    assert latest_checkpoint(tmp_path).name == "step-1"


def test_the_checkpoint_just_written_is_never_pruned_and_damaged_later_ones_are_set_aside(tmp_path, tok):
    # Damaged step-4 and step-6 (a resume falls back past them and starts again): pruning by number deleted each new
    # step-0, step-2 straight after writing it, so the run never had an intact checkpoint to resume from.
    from opd.checkpoint import set_aside_after

    save_steps(tmp_path, tok, [4, 6])
    for step in (4, 6):
        _flip_bytes(tmp_path / "checkpoints" / f"step-{step}" / "model.safetensors")
    save_checkpoint(tmp_path, 0, make_model(tok), tok, state_for(0), keep=1)
    assert (tmp_path / "checkpoints" / "step-0").is_dir()  # kept, whatever later-numbered folders hold
    moved = set_aside_after(tmp_path, 0)
    assert [p.name for p in moved] == ["step-4", "step-6"] and all(p.parent.name == "damaged" for p in moved)
    save_checkpoint(tmp_path, 2, make_model(tok), tok, state_for(2), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2"] and latest_checkpoint(tmp_path).name == "step-2"
