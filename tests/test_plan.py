"""The sizing cost model (`opd plan`) on numbers that can be checked by hand."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from opd.config import ConfigError
from opd.plan import (Devices, ModelShape, Rates, StageRate, Workload, balanced_devices, fit_rate, gpu_rates, predict,
                      rescale, stage_seconds, stage_work)

# 1000 matmul parameters, no attention term (attn_dim = 0 -> hidden = 0 is not allowed; context 0 instead)
TOY = ModelShape(params=1000, layers=1, hidden=10, vocab=10, attn_dim=1)


def rates(rollout=(0.0, 1e6), teacher=(0.0, 1e6), train=(0.0, 1e6)) -> Rates:
    return Rates(StageRate(*rollout), StageRate(*teacher), StageRate(*train))


def test_flops_by_hand():
    assert TOY.forward_flops(tokens=3, context=0) == 2 * 1000 * 3
    assert TOY.forward_flops(tokens=3, context=5) == 2 * 1000 * 3 + 4 * 1 * 1 * 5 * 3
    untied = ModelShape(params=1000, layers=1, hidden=10, vocab=10, tied_embeddings=False)
    assert untied.matmul_params == 1000 - 100  # the input embedding is a lookup
    assert TOY.kv_bytes(7) == 2 * 1 * 1 * 4 * 7


def test_packed_stages_count_real_tokens_only():
    padded = Workload(batch=4, prompt_tokens=10, completion_tokens=6, decode_steps=8)
    packed = Workload(batch=4, prompt_tokens=10, completion_tokens=6, decode_steps=8, padded=False)
    wa, wb = stage_work(TOY, TOY, padded, Devices()), stage_work(TOY, TOY, packed, Devices())
    assert wa["teacher"]["flops"] == 2 * 1000 * 4 * 18 + 4 * 9 * 4 * 18
    assert wb["teacher"]["flops"] == 2 * 1000 * 4 * 16 + 4 * 8 * 4 * 16
    # decode: 3 live rows per step on average (4 rows x 6 tokens over 8 steps) instead of 4
    assert wb["rollout"]["flops"] == (2 * 1000 * 40 + 4 * 5 * 40) + 8 * (2 * 1000 * 3 + 4 * 14 * 3)


def test_stage_work_and_seconds_by_hand():
    work = Workload(batch=4, prompt_tokens=10, completion_tokens=6, decode_steps=8, updates_per_batch=2,
                    teacher_batch_size=3)
    w = stage_work(TOY, TOY, work, Devices(rollout=2, teacher=1, train=4))
    assert w["rollout"]["calls"] == 9  # prefill + 8 decode steps
    assert w["teacher"]["calls"] == 2  # 4 sequences, 3 per forward
    assert w["train"]["calls"] == 2
    # train: forward + backward = 3 forwards over 4 rows of 10 + 8 tokens (padded to the longest completion),
    # split over 4 devices, context 9 on average
    assert w["train"]["flops"] == 3 * (2 * 1000 * 18 + 4 * 1 * 1 * 9 * 18)
    # rollout: 2 rows per device; prefill of 10 tokens (context 5), then 8 steps of one token per row (context 14)
    assert w["rollout"]["flops"] == (2 * 1000 * 20 + 4 * 5 * 20) + 8 * (2 * 1000 * 2 + 4 * 14 * 2)
    # 2 s of overhead + 1000 FLOPs at 100 FLOP/s; a memory-bound stage takes the bytes' time instead
    assert stage_seconds(StageRate(0.5, 100.0), calls=4, flops=1000) == pytest.approx(2 + 10)
    assert stage_seconds(StageRate(0.0, 100.0, bytes_per_s=10.0), calls=1, flops=1000, bytes_=500) == pytest.approx(50)


def plan_with_seconds(r, t, u, devices=Devices(), max_policy_lag=None, overhead=False):
    """Rates chosen so that the stages take r, t and u seconds: arithmetic only, or (overhead=True) per-call
    Python overhead only (one call per stage)."""
    work = Workload(batch=1, prompt_tokens=1, completion_tokens=1, decode_steps=0, teacher_batch_size=1)
    if overhead:
        rates_ = Rates(StageRate(r, math.inf), StageRate(t, math.inf), StageRate(u, math.inf))
    else:
        w = stage_work(TOY, TOY, work, devices)
        rates_ = Rates(*(StageRate(0.0, w[s]["flops"] / sec) for s, sec in zip(("rollout", "teacher", "train"), (r, t, u))))
    return predict(TOY, TOY, work, rates_, devices, max_policy_lag)


def test_python_overhead_does_not_overlap_in_the_pipelined_loop():
    # the producer thread and the trainer share one interpreter: per-call overhead holds the GIL
    p = plan_with_seconds(1.0, 3.0, 2.0, overhead=True)
    assert p.sync_step_s == pytest.approx(6.0)
    assert p.overlap_step_s == pytest.approx(6.0) and p.pipelined_step_s == pytest.approx(6.0)


def test_bottleneck_is_the_slowest_stage_and_step_times_are_sum_and_max():
    p = plan_with_seconds(1.0, 3.0, 2.0)
    assert p.stages == {"rollout": 1.0, "teacher": 3.0, "train": 2.0}
    assert p.bottleneck == "teacher"
    assert p.sync_step_s == 6.0
    assert p.overlap_step_s == 4.0 and p.overlap_lag == 1  # rollout + teacher (4) overlap training (2)
    assert p.pipelined_step_s == 3.0 and p.pipelined_lag == 2  # three stages: the slowest one
    assert plan_with_seconds(1.0, 1.0, 5.0).bottleneck == "train"
    assert plan_with_seconds(1.0, 1.0, 5.0).overlap_step_s == 5.0


def test_max_policy_lag_caps_the_pipeline():
    strict = plan_with_seconds(1.0, 3.0, 2.0, max_policy_lag=0)
    assert strict.overlap_step_s == strict.pipelined_step_s == 6.0 and strict.pipelined_lag == 0
    one = plan_with_seconds(1.0, 3.0, 2.0, max_policy_lag=1)
    assert one.pipelined_step_s == 4.0 and one.pipelined_lag == 1


def test_balanced_split_equalises_stage_times():
    seconds = {"rollout": 2.0, "teacher": 6.0, "train": 4.0}
    devices = {"rollout": 1.0, "teacher": 1.0, "train": 1.0}
    split = balanced_devices(seconds, devices)
    assert split == pytest.approx({"rollout": 0.5, "teacher": 1.5, "train": 1.0})
    assert sum(split.values()) == pytest.approx(3.0)
    after = rescale(seconds, devices, split)
    assert after == pytest.approx({"rollout": 4.0, "teacher": 4.0, "train": 4.0})  # 12 device-seconds / 3 devices
    p = plan_with_seconds(2.0, 6.0, 4.0)
    assert p.teacher_to_student_ratio == pytest.approx(1.5 / (0.5 + 1.0))


def test_devices_divide_the_work():
    work = Workload(batch=64, prompt_tokens=100, completion_tokens=100, decode_steps=100)
    one = predict(TOY, TOY, work, rates(), Devices(1, 1, 1))
    four = predict(TOY, TOY, work, rates(), Devices(1, 4, 4))
    assert four.stages["teacher"] == pytest.approx(one.stages["teacher"] / 4)
    assert four.stages["train"] == pytest.approx(one.stages["train"] / 4)
    assert four.stages["rollout"] == one.stages["rollout"]


def test_fit_rate_recovers_overhead_and_throughput():
    truth = StageRate(0.01, 1e9)
    points = [(c, f, c * truth.overhead_s + f / truth.flops_per_s) for c, f in [(10, 1e8), (50, 1e8), (10, 5e9), (3, 2e9)]]
    fitted = fit_rate(points)
    assert fitted.overhead_s == pytest.approx(0.01, rel=1e-6) and fitted.flops_per_s == pytest.approx(1e9, rel=1e-6)
    assert fitted.bytes_per_s is None and not fitted.overlap  # fitted costs add up
    only_overhead = fit_rate([(10, 1e8, 0.1), (20, 3e8, 0.2)])  # seconds follow calls alone
    assert only_overhead.overhead_s == pytest.approx(0.01) and only_overhead.flops_per_s == math.inf
    # three terms: 2 ms per call, 1 GFLOP/s, 100 MB/s
    pts = [(c, f, b, c * 2e-3 + f / 1e9 + b / 1e8) for c, f, b in
           [(10, 1e8, 1e6), (40, 1e8, 5e6), (10, 8e8, 2e6), (25, 3e8, 9e6), (5, 5e8, 1e5)]]
    three = fit_rate(pts)
    assert three.overhead_s == pytest.approx(2e-3) and three.flops_per_s == pytest.approx(1e9)
    assert three.bytes_per_s == pytest.approx(1e8)
    assert stage_seconds(three, 10, 1e8, 1e6) == pytest.approx(10 * 2e-3 + 0.1 + 0.01)


def test_gpu_decode_is_memory_bound_for_a_small_batch():
    # 1.5B parameters in bf16 on an H100 preset: one decode step of 8 sequences moves 3 GB of weights,
    # which takes longer than its 24 GFLOPs at the assumed MFU.
    student = ModelShape(params=1.5e9, layers=28, hidden=1536, vocab=151936, attn_dim=1536, kv_dim=256,
                         bytes_per_param=2)
    r = gpu_rates("h100")
    w = stage_work(student, student, Workload(batch=8, prompt_tokens=0, completion_tokens=1, decode_steps=1), Devices())
    assert w["rollout"]["bytes"] / r.rollout.bytes_per_s > w["rollout"]["flops"] / r.rollout.flops_per_s
    assert "assumed" in r.source


def test_model_shape_from_a_config_and_from_numbers():
    s = ModelShape.from_spec("builtin:arith-student")
    # 2 layers of hidden 64 (attention 4 x 64 x 64, MLP 3 x 64 x 192, 2 norms of 64), 100 x 64 tied embedding, final norm
    assert s.params == 2 * (4 * 64 * 64 + 3 * 64 * 192 + 2 * 64) + 100 * 64 + 64
    assert (s.layers, s.hidden, s.vocab, s.tied_embeddings) == (2, 64, 100, True)
    n = ModelShape.from_spec("params=1.5e9,layers=28,hidden=1536,vocab=151936,bytes=2")
    assert n.params == 1.5e9 and n.layers == 28 and n.bytes_per_param == 2
    with pytest.raises(ConfigError, match="missing layers"):
        ModelShape.from_spec("params=1e9,hidden=10,vocab=5")
    with pytest.raises(ConfigError, match="unknown key"):
        ModelShape.from_spec("params=1e9,layers=2,hidden=10,vocab=5,depth=3")


def test_opd_plan_cli_with_a_calibration_file(tmp_path):
    from typer.testing import CliRunner

    from opd.cli import app

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"rates": rates(rollout=(0.001, 1e8), teacher=(0.002, 1e8), train=(0.01, 1e8)).to_json()}))
    r = CliRunner().invoke(app, ["plan", "--calibration", str(cal), "--json", "--prompt-tokens", "20",
                                 "--set", "prompts.batch_size=8", "--set", "rollout.max_new_tokens=32"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)["plan"]
    assert plan["tokens_per_step"] == 8 * (20 + 32)
    assert plan["sync_step_s"] == pytest.approx(sum(plan["stages"].values()))
    r = CliRunner().invoke(app, ["plan"])
    assert r.exit_code == 2 and "needs rates" in r.output
    r = CliRunner().invoke(app, ["plan", "--calibration", str(cal), "--gpu", "h100"])  # one would be ignored
    assert r.exit_code == 2 and "use one" in r.output


def test_calibration_times_the_real_stages():
    from opd.config import load_config
    from opd.plan import calibrate

    cfg = load_config(None, ["objective.name='pg'"])
    data = calibrate(cfg, sizes=((2, 4), (4, 8), (2, 8)), steps=3, log=lambda *a: None)
    r = Rates.from_json(data["rates"])
    for stage in ("rollout", "teacher", "train"):
        assert len(data["points"][stage]) == 3 and all(p[-1] > 0 for p in data["points"][stage])
        rate = getattr(r, stage)
        assert rate.overhead_s >= 0 and rate.flops_per_s > 0 and not rate.overlap
        assert rate.overhead_s > 0 or rate.flops_per_s < math.inf or rate.bytes_per_s  # something costs time


def test_a_drop_layers_student_is_planned_at_the_depth_it_trains_at():
    # student.init = "drop_layers" keeps layers 0, k, 2k, ...: the plan sized it at the full depth (1.65x its FLOPs).
    from opd.config import load_config
    from opd.models import load_student

    cfg = load_config(None, ["student.model='builtin:arith-teacher'", "student.init='drop_layers'",
                             "student.keep_every=2"])
    planned, real = ModelShape.student_of(cfg), load_student(cfg.student, 0)
    assert planned.layers == real.config.num_hidden_layers < ModelShape.from_spec("builtin:arith-teacher").layers
    assert planned.params == sum(p.numel() for p in real.parameters())


def test_calibrating_a_drop_layers_config_times_the_student_at_its_trained_depth(monkeypatch):
    # The calibration runs force a random student, which loaded at full depth while the fit used the dropped
    # depth's FLOPs: rates ~1.65x too slow for the half-depth SmolLM2 config.
    import opd.loop
    from opd.config import load_config
    from opd.models import resolve_model_path
    from opd.plan import calibrate
    from transformers import AutoConfig

    depths, real = [], opd.loop.run

    def spy(cfg, *a, **k):
        depths.append(AutoConfig.from_pretrained(resolve_model_path(cfg.student.model)).num_hidden_layers)
        return real(cfg, *a, **k)

    monkeypatch.setattr(opd.loop, "run", spy)
    cfg = load_config(None, ["objective.name='pg'", "student.model='builtin:arith-teacher'",
                             "student.init='drop_layers'", "student.keep_every=2"])
    data = calibrate(cfg, sizes=((2, 4), (2, 8)), steps=3, log=lambda *a: None)
    assert depths == [ModelShape.student_of(cfg).layers] * 2 == [data["student"]["layers"]] * 2
    assert depths[0] < ModelShape.from_spec("builtin:arith-teacher").layers


def test_lags_count_policy_versions_and_the_reference_forward_costs_train_time():
    # max_policy_lag counts versions: with updates_per_batch = 4 a lag of 2 makes no batch ahead (the loop:
    # 2 // 4 = 0), and a batch made one step ahead trains at lag 4; kl_ref_coef adds the reference's forward.
    s = ModelShape.from_spec("params=1e8,layers=12,hidden=768,vocab=50000")
    rates = Rates(*(StageRate(1e-3, 1e12, None, False) for _ in range(3)))
    work = Workload(batch=8, prompt_tokens=64, completion_tokens=64, decode_steps=64, updates_per_batch=4)
    strict = predict(s, s, work, rates, max_policy_lag=2)
    assert strict.overlap_step_s == strict.pipelined_step_s == strict.sync_step_s
    loose = predict(s, s, work, rates, max_policy_lag=8)
    assert (loose.overlap_lag, loose.pipelined_lag) == (4, 8) and loose.pipelined_step_s < loose.sync_step_s
    with_ref = predict(s, s, dataclasses.replace(work, reference=True), rates)
    plain = predict(s, s, work, rates)
    assert with_ref.stages["train"] > plain.stages["train"] and with_ref.stages["rollout"] == plain.stages["rollout"]


def test_a_numeric_shape_takes_the_dtypes_bytes_and_infinite_rates_write_null():
    assert ModelShape.from_spec("params=1e9,layers=2,hidden=8,vocab=8", "bfloat16").bytes_per_param == 2
    assert ModelShape.from_spec("params=1e9,layers=2,hidden=8,vocab=8,bytes=4", "bfloat16").bytes_per_param == 4
    rates = Rates(StageRate(1e-3, math.inf, None, False), StageRate(0, 1e9), StageRate(0, 1e9))
    text = json.dumps(rates.to_json())
    assert "Infinity" not in text and Rates.from_json(json.loads(text)) == rates


def test_calibrate_with_a_gpu_preset_is_refused():
    r = subprocess.run([sys.executable, "-m", "opd.cli", "plan", "--calibrate", "--gpu", "h100"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--calibrate" in r.stderr and "--gpu" in r.stderr
