"""The loop end to end on the built-in teacher, small settings: metrics, checkpoints, exports, exact resume."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.checkpoint import list_checkpoints
from opd.config import load_config
from opd.loop import run
from opd.monitor import read_metrics

REQUIRED = [
    "step", "rollout/tokens", "teacher/logprob_mean", "student/logprob_mean", "opd/advantage_mean", "opd/reverse_kl",
    "freshness/policy_lag", "freshness/ratio_mean", "freshness/ratio_max", "teacher/tokens_per_s", "teacher/coverage",
    "teacher/failures", "stability/grad_norm", "stability/clip_frac", "stability/entropy", "time/step_s",
    "health/freshness", "health/teacher_access", "health/stability", "budget/teacher_tokens",
]
SMALL = [
    "prompts.batch_size=8", "eval.size=16", "eval.every=2", "student.warm_start_steps=5",
    "student.warm_start_samples=32", "train.checkpoint_every=2", "rollout.max_new_tokens=48", "monitor.live='off'",
]


def small_config(*extra):
    return load_config(None, SMALL + list(extra))


def quiet(*a, **k):
    pass


def straight_and_resumed(tmp_path, *extra):
    """One run of 4 steps straight through, and the same run stopped after 2 and resumed to 4: their folders."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(small_config("train.max_steps=4", *extra), straight, log=quiet)
    run(small_config("train.max_steps=2", *extra), split, log=quiet)
    run(small_config("train.max_steps=4", *extra), split, resume=True, log=quiet)
    return straight, split


def test_loop_writes_metrics_checkpoints_and_a_loadable_student(tmp_path):
    cfg = small_config("train.max_steps=4", "objective.kl_ref_coef=0.1")
    result = run(cfg, tmp_path, log=quiet)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/accuracy" in rows[0] and "eval/reverse_kl" in rows[0]
    for r in rows[1:]:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["teacher/coverage"] == 1.0 and r["freshness/policy_lag"] == 0
        assert math.isfinite(r["opd/reverse_kl"]) and "stability/kl_ref" in r
    assert all("eval/reverse_kl" in rows[s] for s in (2, 4)) and "eval/reverse_kl" not in rows[3]
    # Budget counters only grow.
    spent = [r["budget/teacher_tokens"] for r in rows]
    assert spent == sorted(spent) and spent[-1] > spent[0] > 0
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-4"]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "final" / "tokenizer.json").is_file()
    assert final.config.architectures == ["LlamaForCausalLM"]
    assert (tmp_path / "config.toml").read_text().count("[rollout]") == 1
    assert any((tmp_path / "tensorboard").iterdir())
    assert result.first_eval["eval/reverse_kl"] == rows[0]["eval/reverse_kl"]


def _comparable(rows):
    drop = ("time/", "tokens_per_s", "latency")
    return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]


def test_resume_continues_exactly(tmp_path):
    straight, split = straight_and_resumed(tmp_path)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "final").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _comparable(read_metrics(straight)) == _comparable(read_metrics(split))


def test_teacher_fault_counters_carry_across_a_resume(tmp_path, monkeypatch):
    # The teacher clients' cumulative counters (teacher/*_total) start from zero in a new process; a resumed run
    # adds them to those saved with its checkpoint, so its totals equal an uninterrupted run's.
    import opd.loop

    real_build = opd.loop.build_teachers

    def counting_teachers(*args, **kwargs):
        teacher = real_build(*args, **kwargs)
        calls = {"n": 0}
        real_score = teacher.score

        def score(rollout, **kw):
            calls["n"] += 1
            return real_score(rollout, **kw)

        teacher.score = score
        teacher.counters = lambda: {"teacher/calls_total": float(calls["n"])}
        return teacher

    monkeypatch.setattr(opd.loop, "build_teachers", counting_teachers)
    straight, split = straight_and_resumed(tmp_path)
    totals = [[r["teacher/calls_total"] for r in read_metrics(d) if r["step"] > 0] for d in (straight, split)]
    assert totals[0] == totals[1] and totals[0][-1] > totals[0][1] > 0  # steps 1-4


def test_every_objective_runs_in_the_loop(tmp_path):
    for name, extra in [("reverse_kl", []), ("gkd", []), ("topk_kl", ["teacher.topk=5"]),
                        ("hybrid", ["rollout.samples_per_prompt=2", "prompts.batch_size=4"])]:
        cfg = small_config("train.max_steps=1", f"objective.name='{name}'", "eval.size=4", "train.checkpoint_every=0",
                           "monitor.tensorboard=false", *extra)
        run(cfg, tmp_path / name, log=quiet)
        rows = read_metrics(tmp_path / name)
        assert rows[-1]["step"] == 1 and math.isfinite(rows[-1]["update/loss"]), name


def test_lora_student_resumes_exactly_and_exports_merged(tmp_path):
    lora = ["student.lora_rank=4", "student.lora_target_modules=['q_proj', 'v_proj']", "objective.name='pg'"]
    straight, split = straight_and_resumed(tmp_path, *lora)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "final").state_dict()
    assert set(a) == set(AutoModelForCausalLM.from_pretrained(split / "checkpoints" / "step-2").state_dict())
    assert not any("lora_" in k for k in a)  # checkpoints and final/ are merged plain models
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra, guided", [
    (["feedback.broken_prefix='truncate'", "feedback.break_window=1"], False),
    (["feedback.broken_prefix='downweight'"], False),
    (["rollout.teacher_mix=0.5"], True),
    (["rollout.teacher_correct_topk=2", "objective.name='pg'"], True),
])
def test_broken_prefix_handling_and_guided_rollouts_in_the_loop(tmp_path, extra, guided):
    cfg = small_config("train.max_steps=2", "eval.size=4", "train.checkpoint_every=0", "monitor.tensorboard=false",
                       "eval.recovery_size=4", *extra)
    run(cfg, tmp_path, log=quiet)
    rows = read_metrics(tmp_path)
    for r in rows[1:]:
        assert 0 <= r["teacher/broken_frac"] <= 1 and r["teacher/entropy"] >= 0 and "feedback/tokens_dropped" in r
        assert ("rollout/teacher_token_frac" in r) == guided
        if guided:
            assert 0 < r["rollout/teacher_token_frac"] <= 1
            # the teacher ran a forward for every sampled token and scored every one: twice the tokens
            spent = r["budget/teacher_tokens"] - rows[rows.index(r) - 1]["budget/teacher_tokens"]
            assert spent == 2 * r["rollout/tokens"]
    assert {"eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood"} <= set(rows[-1])


def test_a_bf16_sampling_copy_writes_the_rollouts(tmp_path):
    # rollout.dtype = "bfloat16": the loop samples with a bf16 copy refreshed every step; the fp32 update's
    # recomputed logprobs stay close to the copy's behaviour logprobs (rounding only, never a stale policy).
    run(small_config("train.max_steps=2", "rollout.dtype='bfloat16'", "eval.every=0"), tmp_path, log=quiet)
    rows = read_metrics(tmp_path)
    steps = [r for r in rows if r["step"] >= 1]
    assert len(steps) == 2
    for r in steps:
        assert r["freshness/policy_lag"] == 0
        assert 0 < r["freshness/logprob_drift"] < 0.05


@pytest.mark.parametrize("lacks_bf16", [True, False])
def test_int8_rollouts_train_on_either_kind_of_cpu(tmp_path, monkeypatch, lacks_bf16):
    # rollout.dtype = "int8": decode steps read int8 weights, prefilled by the fp32 student itself on a CPU without
    # bf16 instructions or by a bf16 copy on one with them; either way the update's recomputed fp32 logprobs stay
    # close to the behaviour logprobs (rounding, shown as drift), and no warning of a fallback is logged.
    from opd import matmul

    monkeypatch.setattr(matmul, "cpu_lacks_bf16", lambda: lacks_bf16)
    said = []
    run(small_config("train.max_steps=2", "rollout.dtype='int8'", "eval.every=0"), tmp_path, log=said.append)
    assert not [m for m in said if "int8" in m and m.startswith("warning")]
    steps = [r for r in read_metrics(tmp_path) if r["step"] >= 1]
    assert len(steps) == 2
    for r in steps:
        assert r["freshness/policy_lag"] == 0
        assert 1e-4 < r["freshness/logprob_drift"] < 0.2  # the student's own fp32 decoding drifts ~1e-7


def test_bf16_weights_train_through_the_sampling_copy_and_resume_exactly(tmp_path):
    # train.bf16_weights: the update runs on the rollout's bf16 copy and the optimizer writes it; the fp32 student
    # stays the master, so a resumed run (a fresh copy, the optimizer's state from the checkpoint) continues exactly
    extra = ("rollout.dtype='int8'", "train.bf16_weights=true")
    straight, split = straight_and_resumed(tmp_path, *extra)
    a = AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(split / "final").state_dict()
    assert all(t.dtype == torch.float32 for t in a.values())  # the master weights are what is saved
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = read_metrics(straight)
    assert _comparable(rows) == _comparable(read_metrics(split))
    steps = [r for r in rows if r["step"] >= 1]
    assert all(r["freshness/policy_lag"] == 0 and r["freshness/logprob_drift"] < 0.2 for r in steps)
    assert steps[-1]["opd/reverse_kl"] < steps[0]["opd/reverse_kl"]  # it trains


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, ["train.autocast = 'bfloat16'", "rollout.dtype = 'bfloat16'", "teacher.dtype = 'bfloat16'"]),
    ({"avx2", "avx512f", "avx512_bf16"}, []),  # bf16 instructions: nothing to say
    ({"fp", "asimd"}, []),  # not x86: not known, so no warning
])
def test_bf16_settings_on_a_cpu_without_bf16_instructions_are_named(monkeypatch, flags, expected):
    import opd.loop
    from opd import matmul

    monkeypatch.setattr(matmul, "cpu_flags", lambda: frozenset(flags))
    cfg = load_config(None, ["train.autocast='bfloat16'", "rollout.dtype='bfloat16'", "teacher.dtype='bfloat16'"])
    assert opd.loop.bf16_on_a_cpu_without_it(cfg) == expected
    # int8 decoding runs no bf16 matmul there: the fp32 student prefills (opd.rollout.sampling_copy_for)
    assert opd.loop.bf16_on_a_cpu_without_it(load_config(None, ["rollout.dtype='int8'"])) == []
    assert opd.loop.bf16_on_a_cpu_without_it(load_config(None)) == []  # the fp32 default


def test_the_run_log_warns_of_bf16_on_a_cpu_without_it(tmp_path, monkeypatch):
    from opd import matmul

    monkeypatch.setattr(matmul, "cpu_flags", lambda: frozenset({"avx2"}))
    said = []
    run(small_config("train.max_steps=1", "teacher.dtype='bfloat16'", "eval.every=0", "student.warm_start_steps=0"),
        tmp_path, log=said.append)
    assert any(m.startswith("warning: teacher.dtype = 'bfloat16' on a CPU without bf16 instructions") for m in said)


def test_a_resume_trains_with_the_configs_lr_betas_and_weight_decay(tmp_path):
    # The optimizer's and the scheduler's load_state_dict bring back the values they were made with; a resume whose
    # config changed them must train with the new ones (its config.toml says so), and say what changed.
    base = ["train.schedule='constant'", "train.warmup_steps=0", "student.warm_start_steps=0", "eval.every=0",
            "train.checkpoint_every=1", "monitor.tensorboard=false"]
    run(small_config("train.max_steps=2", "train.lr=1e-3", *base), tmp_path, log=quiet)
    said = []
    run(small_config("train.max_steps=3", "train.lr=1e-5", "train.weight_decay=0.25", "train.betas=[0.5, 0.9]", *base),
        tmp_path, resume=True, log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert [r["train/lr"] for r in read_metrics(tmp_path) if r["step"] > 0] == pytest.approx([1e-3, 1e-3, 1e-5])
    from opd.checkpoint import load_trainer_state

    group = load_trainer_state(list_checkpoints(tmp_path)[-1])["optimizer"]["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-5) and group["weight_decay"] == 0.25 and tuple(group["betas"]) == (0.5, 0.9)
    assert any("train.lr 0.001 -> 1e-05" in line and "train.weight_decay" in line for line in said)


def test_a_run_folder_holds_one_run(tmp_path):
    # A second fresh run in a used folder would prune the first one's checkpoints by step number and make a later
    # --resume continue the first run's weights under the second one's config; an offline run or a LoRA run is
    # continued only as what it is; and a resume that fails leaves the run's config.toml as it was.
    from opd.config import ConfigError

    base = ["student.warm_start_steps=0", "eval.every=0", "train.checkpoint_every=1", "monitor.tensorboard=false",
            "train.max_steps=1"]
    run(small_config(*base), tmp_path / "a", log=quiet)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run(small_config(*base, "seed=1"), tmp_path / "a", log=quiet)
    with pytest.raises(ConfigError, match="on-policy run.*opd run --resume"):
        run(small_config(*base), tmp_path / "a", resume=True, log=quiet, mode="offline")
    with pytest.raises(ConfigError, match="without LoRA.*lora_rank = 4"):
        run(small_config(*base, "student.lora_rank=4"), tmp_path / "a", resume=True, log=quiet)
    recorded = (tmp_path / "a" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="nowhere"):
        run(small_config(*base, "train.max_steps=2", "teacher.model='nowhere/model'"), tmp_path / "a", resume=True,
            log=quiet)
    assert (tmp_path / "a" / "config.toml").read_text() == recorded
    run(small_config(*base, "train.max_steps=2"), tmp_path / "a", resume=True, log=quiet)  # its own settings: goes on
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [0, 1, 2]
    assert "max_steps = 2" in (tmp_path / "a" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="at step 2 already, past train.max_steps = 1"):
        run(small_config(*base, "train.max_steps=1"), tmp_path / "a", resume=True, log=quiet)
    assert "max_steps = 2" in (tmp_path / "a" / "config.toml").read_text()
    # resumed with nothing left to run: the summary's latest evaluation is the run's, not step 0's
    result = run(small_config(*base, "train.max_steps=2", "eval.every=1"), tmp_path / "a", resume=True, log=quiet)
    evals = [r for r in read_metrics(tmp_path / "a") if "eval/reverse_kl" in r]
    assert result.last_eval["eval/reverse_kl"] == evals[-1]["eval/reverse_kl"]


def test_joined_rollouts_keep_the_students_own_logprobs_and_the_teachers_share():
    # The Ray engine joins its workers' rollouts; dropping a guided rollout's student logprobs made A_t compare the
    # teacher with the guided mixture instead of the student (and lost rollout/teacher_token_frac).
    from opd.loop import concat_rollouts
    from opd.types import Prompt, Rollout

    def rollout(T, guided):
        lp = -torch.rand(2, T)
        return Rollout(prompts=[Prompt("a", "s")] * 2, prompt_ids=torch.ones(2, 3, dtype=torch.long),
                       prompt_mask=torch.ones(2, 3, dtype=torch.long), completion_ids=torch.ones(2, T, dtype=torch.long),
                       completion_mask=torch.ones(2, T, dtype=torch.long), behaviour_logprobs=lp,
                       policy_version=torch.zeros(2, dtype=torch.long), texts=["x", "y"],
                       finished=torch.ones(2, dtype=torch.bool),
                       student_logprobs=lp - 1 if guided else None, teacher_share=torch.rand(2, T) if guided else None)

    parts = [rollout(4, True), rollout(3, False)]
    joined = concat_rollouts(parts, pad_id=0)
    assert torch.equal(joined.policy_logprobs[:2], parts[0].student_logprobs)
    assert torch.equal(joined.policy_logprobs[2:, :3], parts[1].behaviour_logprobs)  # unguided: its own sampling
    assert torch.equal(joined.teacher_share[:2], parts[0].teacher_share) and not joined.teacher_share[2:].any()
    plain = concat_rollouts([rollout(4, False), rollout(3, False)], pad_id=0)
    assert plain.student_logprobs is None and plain.teacher_share is None


@pytest.mark.parametrize("extra", [[], ["teacher.topk=8", "objective.name='topk_kl'"]])
def test_a_same_tokenizer_teacher_with_a_wider_lm_head_trains(tmp_path, extra):
    # Model families pad their LM heads to different widths with one tokenizer (Qwen2.5-0.5B 151,936, 7B 152,064):
    # the full-distribution objectives crashed on the width mismatch, topk_kl indexed past the student's head.
    from opd.models import load_model, load_tokenizer

    wide = load_model("builtin:arith-teacher")
    width = wide.get_output_embeddings().weight.shape[0]
    wide.resize_token_embeddings(width + 64)
    with torch.no_grad():  # make the extra ids likely enough to reach the top-k
        wide.get_output_embeddings().weight[width:] = wide.get_output_embeddings().weight[:64]
    wide.save_pretrained(tmp_path / "wide")
    load_tokenizer("builtin:arith-teacher").save_pretrained(tmp_path / "wide")
    run(small_config("train.max_steps=2", "eval.every=0", "student.warm_start_steps=0", "train.checkpoint_every=0",
                     f"teacher.model='{tmp_path / 'wide'}'", *extra), tmp_path / "run", log=quiet)
    rows = [r for r in read_metrics(tmp_path / "run") if r["step"] >= 1]
    assert len(rows) == 2 and all(r["stability/skipped_batches"] == 0 for r in rows)
    assert all(math.isfinite(r["update/distribution_loss"]) and r["update/distribution_loss"] >= 0 for r in rows)


def test_fit_vocab_narrows_or_widens_the_teachers_distribution():
    from opd.objectives.losses import topk_kl
    from opd.types import TeacherScores

    g = torch.Generator().manual_seed(0)
    full = torch.log_softmax(torch.randn(2, 3, 12, generator=g), -1)
    s = TeacherScores(token_logprobs=torch.zeros(2, 3), scored_mask=torch.ones(2, 3), full_logprobs=full,
                      topk_ids=full.topk(4, -1).indices, topk_logprobs=full.topk(4, -1).values)
    narrow = s.fit_vocab(10)
    torch.testing.assert_close(narrow.full_logprobs.exp().sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(narrow.full_logprobs, torch.log_softmax(full[..., :10], -1))
    past = s.topk_ids >= 10
    assert past.any() and torch.equal(torch.isneginf(narrow.topk_logprobs), past) and narrow.topk_ids.max() < 10
    wider = s.fit_vocab(15)
    assert torch.isfinite(wider.full_logprobs).all() and wider.full_logprobs.shape[-1] == 15
    torch.testing.assert_close(wider.full_logprobs.exp().sum(-1), torch.ones(2, 3))
    assert s.fit_vocab(12) is s  # the common case: nothing copied
    # an emptied top-k entry is no bin: finite loss and gradients, equal to the K-bin KL without it
    for direction in ("forward", "reverse"):
        student = torch.log_softmax(torch.randn(6, 10, generator=g), -1).requires_grad_()
        ids, lp = narrow.topk_ids.reshape(6, 4), narrow.topk_logprobs.reshape(6, 4)
        loss = topk_kl(student, ids, lp, direction)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
        row = int(torch.nonzero(torch.isneginf(lp).any(-1))[0])
        keep = ~torch.isneginf(lp[row])
        alone = topk_kl(student.detach()[row:row + 1], ids[row:row + 1, keep], lp[row:row + 1, keep], direction)
        torch.testing.assert_close(loss[row:row + 1].detach(), alone)


def test_a_resume_that_adds_the_reference_penalty_takes_checkpoint_0_or_is_refused(tmp_path):
    # The reference was made only by a run that began with kl_ref_coef > 0: a resume adding it trained without it
    # (no stability/kl_ref, nothing said) although config.toml recorded the penalty.
    from opd.config import ConfigError

    run(small_config("train.max_steps=2", "train.keep_checkpoints=5"), tmp_path / "kept", log=quiet)
    said = []
    run(small_config("train.max_steps=3", "train.keep_checkpoints=5", "objective.kl_ref_coef=0.5"), tmp_path / "kept",
        resume=True, log=said.append)
    assert any("the reference is checkpoint 0's student" in m for m in said)
    assert "stability/kl_ref" in read_metrics(tmp_path / "kept")[-1] and (tmp_path / "kept" / "reference").is_dir()
    step0 = AutoModelForCausalLM.from_pretrained(tmp_path / "kept" / "checkpoints" / "step-0").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "kept" / "reference").state_dict()
    assert all(torch.equal(step0[k], ref[k]) for k in step0)

    run(small_config("train.max_steps=2", "train.keep_checkpoints=1"), tmp_path / "pruned", log=quiet)
    before = (tmp_path / "pruned" / "config.toml").read_text()
    with pytest.raises(ConfigError, match="resume with objective.kl_ref_coef = 0"):
        run(small_config("train.max_steps=3", "objective.kl_ref_coef=0.5"), tmp_path / "pruned", resume=True, log=quiet)
    assert (tmp_path / "pruned" / "config.toml").read_text() == before


def test_the_warm_starts_flops_count_the_rows_it_trains(tmp_path):
    # A mini-batch larger than the warm-start data trains every row once a step, not batch_size / n times its tokens.
    from opd.models import count_params, load_model

    cfg = small_config("train.max_steps=0", "student.warm_start_samples=8", "student.warm_start_batch_size=32",
                       "student.warm_start_steps=3", "monitor.tensorboard=false")
    run(cfg, tmp_path, log=quiet)
    row = read_metrics(tmp_path)[0]
    tokens = row["budget/teacher_tokens"]
    n_teacher = count_params(load_model("builtin:arith-teacher", device="cpu"))
    n_student = count_params(load_model("builtin:arith-student", init="random", device="cpu"))
    assert row["budget/flops"] == pytest.approx(2 * n_teacher * tokens + 6 * n_student * tokens * 3, rel=1e-9)


def test_reverse_kl_of_guided_rollouts_is_weighted_back_to_the_student_or_left_out():
    # Tokens drawn from q (a teacher mixture, a nucleus) averaged unweighted gave E_q[log pi_theta - log pi_T], not
    # KL(pi_theta || pi_T): 4.57 for an exact 6.79 at teacher_mix = 0.25, negative at teacher_mix = 1.
    from opd.config import FeedbackConfig
    from opd.feedback import compute_feedback
    from opd.loop import _step_metrics
    from opd.rollout import SamplingParams, sample
    from opd.rollout.guidance import TeacherGuide
    from opd.teacher import LocalTeacher

    import numpy as np

    from opd.models import load_model, load_tokenizer
    from opd.prompts.tasks import get_task

    tokenizer, teacher_model = load_tokenizer("builtin:arith-teacher"), load_model("builtin:arith-teacher", device="cpu")
    student = load_model("builtin:arith-student", init="random", device="cpu")  # far from the teacher: KL ~ 8
    rng = np.random.default_rng(0)
    many = [get_task("arith").sample(rng) for _ in range(32)]
    times = {"rollout_s": 1.0, "teacher_s": 1.0}
    roll = sample(student, tokenizer, many, SamplingParams(max_new_tokens=24), generator=torch.Generator().manual_seed(0),
                  guide=TeacherGuide(teacher_model, mix=0.25))
    scores = LocalTeacher(teacher_model).score(roll, full=True)
    got = _step_metrics(roll, scores, compute_feedback(roll, scores, FeedbackConfig()), [None] * 32, times)
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=torch.cat([roll.prompt_mask, roll.completion_mask], 1)).logits
    lp = torch.log_softmax(logits[:, roll.prompt_ids.shape[1] - 1 : -1].double(), -1)
    exact = (lp.exp() * (lp - scores.full_logprobs.double())).sum(-1)[roll.completion_mask.bool()].mean()
    assert got["opd/reverse_kl"] == pytest.approx(float(exact), rel=0.1)
    assert "opd/reverse_kl" not in _step_metrics(roll, scores, compute_feedback(roll, scores, FeedbackConfig()),
                                                 [None] * 32, times, kl_estimable=False)
