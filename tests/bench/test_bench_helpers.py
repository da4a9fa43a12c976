"""The benchmark suite's helpers: FLOP counting, the matmul-limit measurement, the results table."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402
import results_table  # noqa: E402


def test_flop_counts_follow_the_dense_transformer_rules():
    assert common.forward_flops(params=1_000, tokens=10) == 20_000
    assert common.train_flops(params=1_000, tokens=10) == 60_000
    assert common.train_flops(7, 3) == 3 * common.forward_flops(7, 3)
    assert common.matmul_flop(2, 3, 4) == 2 * 2 * 3 * 4


def test_fraction_of_limit_is_achieved_flops_over_the_limit():
    # 100 tokens/s x 2e9 FLOP/token = 2e11 FLOP/s, against a 4e11 limit
    assert common.fraction_of_limit(100, 2e9, 4e11) == pytest.approx(0.5)


def test_matmul_limit_measures_a_positive_rate_for_both_dtypes():
    for dtype in ("float32", "bfloat16"):
        row = common.measure_matmul_limit(dtype, size=64, min_seconds=0.0)
        assert row["dtype"] == dtype and row["size"] == 64 and row["calls"] >= 3
        assert row["flops_per_s"] > 0
        # the limit is the faster of the kernels measured (torch.matmul, and oneDNN where torch has it)
        assert "torch.matmul" in row["by_kernel"] and row["kernel"] in row["by_kernel"]
        assert row["flops_per_s"] == max(row["by_kernel"].values()) == row["by_kernel"][row["kernel"]]
        # and in bf16 opd's own tile-unit kernel where it runs: a limit must not sit below what opd itself reaches
        from opd import cpu_kernels

        assert ("opd AMX" in row["by_kernel"]) == (dtype == "bfloat16" and cpu_kernels.gemm_amx())


def test_quick_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert common.quick()
    monkeypatch.setenv("BENCH_QUICK", "0")
    assert not common.quick()
    monkeypatch.delenv("BENCH_QUICK")
    assert not common.quick()


def test_write_result_records_command_machine_and_headline(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    monkeypatch.setenv("BUDGET_S", "60")
    path = common.write_result("demo", {"figures": [1, 2]}, headline=[{"figure": "x", "value": 1.5, "unit": "tok/s"}])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "demo" and data["figures"] == [1, 2]
    assert data["command"].startswith("BUDGET_S=60 python ")  # the settings a re-run needs
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads"):
        assert key in data["machine"]
    assert data["headline"][0]["value"] == 1.5


def test_bench_results_sends_a_runs_files_to_another_folder(tmp_path, monkeypatch):
    import importlib

    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "other-machine"))
    try:
        fresh = importlib.reload(common)
        path = fresh.write_result("demo", {"figures": []})
        assert path == tmp_path / "other-machine" / "demo.json"
        assert "BENCH_RESULTS=" in json.loads(path.read_text())["command"]  # a re-run writes to the same place
    finally:
        monkeypatch.delenv("BENCH_RESULTS")
        importlib.reload(common)
    assert common.RESULTS == Path(common.__file__).parent / "results"


def test_results_table_lists_headlines_and_other_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({
        "command": "python bench/a.py", "date": "2026-01-01 00:00", "quick": True,
        "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "torch_threads": 2, "torch": "2.x"},
        "headline": [{"figure": "speed", "value": 1234.5, "unit": "tok/s"}, {"figure": "ratio", "value": 5.25, "unit": "x"}],
    }))
    (tmp_path / "b.json").write_text(json.dumps({"what": "an older result", "command": "python bench/b.py"}))
    (tmp_path / "broken.json").write_text("{not json")
    text = results_table.render(tmp_path)
    assert "| [a.json](a.json) | speed | 1,234 | tok/s | 2026-01-01 00:00 quick | Test CPU, 2 cores, 2 threads, torch 2.x |" in text
    assert "| ratio | 5.25 | x |" in text
    assert "- [b.json](b.json): an older result — `python bench/b.py`" in text
    assert "broken" not in text
    assert "- a.json: `python bench/a.py`" in text


def test_peer_benchmark_splits_prompts_and_configures_opd_like_the_peers(tmp_path):
    import peer_trl

    train, held_out = peer_trl.prompt_records()
    assert len(held_out) == peer_trl.EVAL_PROMPTS and len(train) > len(held_out)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held_out}
    for name, variant in peer_trl.OPD_VARIANTS.items():
        cfg = peer_trl.opd_config(tmp_path / "student", tmp_path / "train.jsonl", variant)
        # Every variant at the peers' batch but the ones named for opd's own best settings.
        want_batch = 16 if name.endswith("-batch16") else peer_trl.BATCH
        assert cfg.prompts.batch_size == want_batch and peer_trl.BATCH == 4
        assert cfg.rollout.max_new_tokens == peer_trl.NEW_TOKENS == 64
        assert cfg.rollout.temperature == 1.0 and cfg.objective.name == "reverse_kl"
        assert cfg.train.lr == peer_trl.LR and cfg.train.schedule == "constant" and cfg.train.warmup_steps == 0
        assert cfg.student.init == "pretrained" and cfg.student.warm_start_steps == 0  # the shared warm start is given
        assert cfg.prompts.sources[0].path == str(tmp_path / "train.jsonl")
    assert peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", peer_trl.OPD_VARIANTS["opd-bf16"]).rollout.dtype == "bfloat16"
    assert peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", peer_trl.OPD_VARIANTS["opd-int8"]).rollout.dtype == "int8"
    fp32 = peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", peer_trl.OPD_VARIANTS["opd-int8-fp32"])
    assert fp32.rollout.dtype == "int8" and fp32.teacher.dtype == "float32" and fp32.train.autocast == "none"
    best_fp32 = peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", peer_trl.OPD_VARIANTS["opd-int8-fp32-batch16"])
    assert best_fp32.teacher.dtype == "float32" and not best_fp32.train.bf16_weights and best_fp32.rollout.dtype == "int8"
    assert not fp32.train.bf16_weights and peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", peer_trl.OPD_VARIANTS["opd-int8"]).train.bf16_weights
    assert set(peer_trl.OPD_OWN_CHOICES) == set(peer_trl.OPD_VARIANTS) - {"opd"}  # each reported in the summary
    # a round's seed reaches both sides: opd's config and TRL's training arguments
    assert peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", {}).seed == 0
    assert peer_trl.opd_config(tmp_path, tmp_path / "t.jsonl", {}, seed=2).seed == 2
    assert peer_trl.common_trl_args(tmp_path, seed=2)["seed"] == 2


def test_peer_rounds_report_medians_and_ratios_of_neighbouring_runs():
    import peer_trl

    def side(tps, kl, probe=(100.0, 100.0), **extra):
        host = {"probe_gflops_before": probe[0], "probe_gflops_after": probe[1], "steal_fraction": 0.0}
        marks = [{"mark": 0.5, "reverse_kl": kl + 0.3}, {"mark": 1.0, "reverse_kl": kl}]
        return {"student_tokens_per_s": tps, "steps": 3, "host": host, **extra,
                "eval": {"reverse_kl": kl, "tokens": 10, "marks": marks, "late_mean": kl + 0.15, "mean_over_budget": kl + 0.2}}

    one = side(50.0, 1.0)
    assert peer_trl.over_rounds([one]) is one  # a single round is reported as it is
    opd = [side(100.0, 0.5, time_share={"rollout": 0.5}), side(60.0, 0.7), side(90.0, 0.9)]
    gkd = [side(50.0, 1.0), side(20.0, 1.2), side(45.0, 1.1)]
    r = peer_trl.over_rounds(opd)
    assert r["student_tokens_per_s"] == 90.0 and r["eval"]["reverse_kl"] == pytest.approx(0.7)
    assert r["eval"]["late_mean"] == pytest.approx(0.85) and r["eval"]["mean_over_budget"] == pytest.approx(0.9) and r["rounds"][2]["reverse_kl_marks"][0]["reverse_kl"] == 1.2
    assert [x["student_tokens_per_s"] for x in r["rounds"]] == [100.0, 60.0, 90.0] and "time_share" in r["rounds"][0]
    assert opd[0]["eval"]["reverse_kl"] == 0.5  # the rounds' own records are left as they were
    # per-round ratios 2.0, 3.0, 2.0: the median of those, not the ratio of the medians (90 / 45 = 2.0 here too)
    assert peer_trl.ratio_to(opd, gkd) == 2.0
    assert peer_trl.ratio_to(opd[1:2], gkd[1:2]) == 3.0
    assert r["rounds"][1]["host"]["probe_gflops_before"] == 100.0
    # at equal host speed: a round whose baseline ran while the host was at half speed (probe 50 around it)
    slow = [side(100.0, 0.5), side(100.0, 0.5)]
    base = [side(50.0, 1.0), side(25.0, 1.0, probe=(40.0, 60.0))]
    assert peer_trl.round_ratios(slow, base) == [2.0, 4.0]
    assert peer_trl.host_adjusted_ratios(slow, base) == pytest.approx([2.0, 2.0])


def test_host_probe_and_steal_are_read_from_this_machine():
    assert common.host_probe(seconds=0.05) > 0
    assert common.cpu_steal_jiffies() >= 0


def test_step_floor_covers_every_linear_weight_of_a_decode_step():
    import step_floor
    import torch

    from opd.models import load_model

    model = load_model("builtin:arith-student", init="random")
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_linear == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the LM head
    assert step_floor.decode_floor_s(model, torch.float32, reps=3) > 0
    assert step_floor.read_bandwidth_gb_s(gib=0.05, reps=2) > 0


def test_remote_scores_reads_a_teacher_servers_prompt_logprobs():
    # bench/teacher_throughput.remote_scores is what teacher_scoring.py times vLLM with; here against a real
    # `opd serve-teacher` process on 127.0.0.1 (started and stopped by the test).
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "teacher"))
    import teacher_throughput
    from teacher_servers import ServerProcess

    from opd.models import load_model

    seqs = [[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]]
    server = ServerProcess().start()
    try:
        got = teacher_throughput.remote_scores(server.url, seqs, concurrency=2)
    finally:
        server.stop()
    want = teacher_throughput.reference_logprobs(load_model("builtin:arith-teacher", device="cpu"), seqs)
    assert [len(g) for g in got] == [5, 5]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=1e-4)


def test_peer_benchmark_snapshots_the_student_at_its_marks(monkeypatch):
    import peer_trl

    clock = {"t": 100.0}
    monkeypatch.setattr(peer_trl.time, "time", lambda: clock["t"])
    weight = torch.nn.Parameter(torch.zeros(3))
    snaps = peer_trl.Snapshots(budget_s=10.0)
    snaps.after_step(lambda: [("w", weight)], 1)  # before the first step began: nothing
    snaps.started(100.0)
    for step, (t, value) in enumerate([(101.0, 1.0), (102.0, 2.0), (106.0, 3.0), (107.0, 4.0), (109.0, 5.0)], 1):
        clock["t"] = t
        with torch.no_grad():
            weight.fill_(value)
        snaps.after_step(lambda: [("w", weight)], step)
    # the first step end past 12.5% (102 s), past 25% and 50% (both 106 s: one step passed two marks), past 75% (109 s);
    # copies, not views of the live weight
    assert [(s["mark"], s["step"], s["elapsed_s"]) for s in snaps.taken] == [
        (0.125, 2, 2.0), (0.25, 3, 6.0), (0.5, 3, 6.0), (0.75, 5, 9.0)]
    assert [float(s["state"]["w"][0]) for s in snaps.taken] == [2.0, 3.0, 3.0, 5.0]


def test_peer_benchmark_reads_the_fp32_master_weights_behind_a_bf16_copy(tokenizer):
    import peer_trl

    from opd.update.bf16 import Bf16Weights
    from tests.conftest import tiny_model

    student = tiny_model(tokenizer, 2)
    weights = Bf16Weights(student)
    named = dict(peer_trl.fp32_named_parameters(weights.model(), weights.optimizer(lr=1e-3, betas=(0.9, 0.99),
                                                                                        weight_decay=0.0)))
    want = dict(student.named_parameters())
    assert named.keys() == want.keys() and all(named[k] is want[k] for k in want)  # the student's own fp32 tensors
    plain = torch.optim.AdamW(student.parameters())
    assert dict(peer_trl.fp32_named_parameters(student, plain)).keys() == want.keys()
