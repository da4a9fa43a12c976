"""Evaluation metrics on hand-checkable cases."""

import json

import numpy as np
import pytest
import torch

from opd.evaluate import _bins, accuracy, detailed_eval, teacher_forced_step_errors
from opd.models import load_model, load_tokenizer
from opd.prompts.tasks import get_task
from opd.rollout import SamplingParams
from opd.teacher import LocalTeacher
from opd.types import Prompt, Rollout


def test_bins_group_by_width():
    assert _bins([(0, 1), (7, 2), (8, 3), (17, 4)], 8) == {0: [1, 2], 8: [3], 16: [4]}


def test_accuracy_ignores_unverifiable_prompts():
    r = Rollout(prompts=[Prompt("1+2=", "t", answer="3"), Prompt("hi", "t"), Prompt("2+2=", "t", answer="4")],
                prompt_ids=torch.zeros(3, 1), prompt_mask=torch.ones(3, 1), completion_ids=torch.zeros(3, 1),
                completion_mask=torch.ones(3, 1), behaviour_logprobs=torch.zeros(3, 1),
                policy_version=torch.zeros(3), texts=["3", "x", "5"], finished=torch.ones(3, dtype=torch.bool))
    assert accuracy([r]) == 0.5


@pytest.fixture(scope="module")
def arith_setup():
    tok = load_tokenizer("builtin:arith-teacher")
    teacher = load_model("builtin:arith-teacher", device="cpu")
    task = get_task("arith")
    prompts = [task.sample(np.random.default_rng([3, i])) for i in range(12)]
    return tok, teacher, task, prompts


def test_teacher_forced_errors_of_the_teacher_are_near_zero_and_a_random_model_errs(arith_setup, student):
    tok, teacher, task, prompts = arith_setup
    errs = teacher_forced_step_errors(teacher, tok, prompts, temperature=1.0)
    assert all(len(e) == len(task.segments(task.solution(p.text))) for e, p in zip(errs, prompts))
    assert np.mean(errs) < 0.05
    assert np.mean(teacher_forced_step_errors(student, tok, prompts, 1.0)) > 0.9  # an untrained model misses nearly all


def test_at_the_first_step_free_running_and_teacher_forced_errors_agree(arith_setup):
    # Both see the same prefix (the prompt) there, so no error can have accumulated: the teacher-forced side must
    # be the error of the distribution the free-running side samples from (it was the greedy choice's: 0.00
    # against 0.09 sampled at temperature 1.5, so excess_error was positive where nothing had accumulated).
    tok, teacher, task, _ = arith_setup
    prompts = [task.sample(np.random.default_rng([5, i])) for i in range(96)]
    res = detailed_eval(teacher, LocalTeacher(teacher), tok, prompts,
                        SamplingParams(temperature=1.5, max_new_tokens=64), seed=0)
    free, forced = res["error_by_step"]["free_running"][0], res["error_by_step"]["teacher_forced"][0]
    assert forced > 0.02  # sampling at 1.5 does miss: the greedy choice's rate (0) would fail here
    assert abs(free - forced) < 0.1  # ~3 standard errors of 96 samples


def test_detailed_eval_of_the_teacher_against_itself(arith_setup):
    tok, teacher, task, prompts = arith_setup
    res = detailed_eval(teacher, LocalTeacher(teacher), tok, prompts, SamplingParams(max_new_tokens=64), seed=0)
    # Scored by itself: the sampled estimate of reverse KL is exactly 0 (same model, same temperature).
    assert res["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    # the built-in teacher scores ~0.92 at temperature 1 (its slips are in the answer digits)
    assert res["eval/accuracy"] >= 0.75 and res["eval/length"] == len(task.solution(prompts[0].text)) + 1
    e = res["error_by_step"]
    assert len(e["free_running"]) == len(e["teacher_forced"]) == len(task.segments(task.solution(prompts[0].text)))
    assert e["excess"] == [a - b for a, b in zip(e["free_running"], e["teacher_forced"])]
    assert set(res["accuracy_by_length"]) == {48}  # every completion has 52 tokens: one bin of width 16
    json.dumps(res)  # serialisable as the CLI writes it


def test_detailed_eval_leaves_unscored_tokens_out_of_the_teachers_nll(arith_setup, student):
    # A teacher that drops sequences (a server) or leaves holes (cross-tokenizer): their tokens hold 0, which
    # detailed_eval counted as an NLL of 0 (5.07 against the run's own evaluate's 10.3 on the same rollouts).
    from opd.evaluate import evaluate

    tok, teacher, _, prompts = arith_setup

    class Holes(LocalTeacher):
        def score(self, rollout, full=False):
            s = super().score(rollout, full=full)
            s.scored_mask[1::2] = 0
            s.token_logprobs[1::2] = 0.0
            return s

    params = SamplingParams(max_new_tokens=24)
    detailed = detailed_eval(student, Holes(teacher), tok, prompts, params, seed=0)
    plain = evaluate(student, Holes(teacher), tok, prompts, params, seed=0)
    assert detailed["eval/teacher_nll"] == pytest.approx(plain["eval/teacher_nll"], rel=1e-6)
    assert plain["eval/teacher_nll"] > 1.0


def test_opd_eval_command_writes_json(tmp_path):
    from typer.testing import CliRunner

    from opd.cli import app
    from opd.models import resolve_model_path

    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(resolve_model_path("builtin:arith-teacher")), "--set", "eval.size=8",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {"eval/accuracy", "eval/reverse_kl", "eval/teacher_nll", "eval/length", "error_by_step"} <= set(data)
    assert "error by step" in res.output
    # recovery from a planted error, on eval.size (8) held-out prompts
    assert {"eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood"} <= set(data)
    assert data["eval/recovery_clean_accuracy"] >= 0.75 and "recovery by corrupted step" in res.output
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "model not found" in res.output
    # an --out whose folder is missing is found out before the evaluation, not after it
    res = CliRunner().invoke(app, ["eval", str(resolve_model_path("builtin:arith-teacher")), "--out",
                                   str(tmp_path / "no" / "x.json")])
    assert res.exit_code == 2 and "no folder" in res.output and "Traceback" not in res.output


def test_opd_eval_refuses_a_damaged_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from opd.checkpoint import save_checkpoint
    from opd.cli import app

    model, tok = load_model("builtin:arith-teacher", device="cpu"), load_tokenizer("builtin:arith-teacher")
    save_checkpoint(tmp_path, 3, model, tok, {"step": 3}, keep=2)
    weights = tmp_path / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    res = CliRunner().invoke(app, ["eval", str(weights.parent)])
    assert res.exit_code == 2 and "damaged checkpoint" in res.output and "checksum" in res.output


def test_evaluate_adds_recovery_scalars_only(arith_setup):
    from opd.evaluate import evaluate
    from opd.recovery import RecoverySettings

    tok, teacher, task, prompts = arith_setup
    params = SamplingParams(max_new_tokens=64)
    plain = evaluate(teacher, LocalTeacher(teacher), tok, prompts[:4], params, seed=0)
    assert not any("recovery" in k for k in plain)
    row = evaluate(teacher, LocalTeacher(teacher), tok, prompts[:4], params, seed=0, recovery=RecoverySettings(size=4))
    assert {"eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood"} <= set(row)
    assert all(isinstance(v, float) for v in row.values())  # a metrics row: no per-step dicts
    assert {k: v for k, v in row.items() if "recovery" not in k} == plain  # the plain eval is unchanged


def test_a_teacher_that_scored_nothing_leaves_its_figures_out(arith_setup, student):
    # They were NaN: written as null, then a resumed run's summary crashed formatting it (and eval --out wrote NaN).
    from opd.evaluate import evaluate

    tok, teacher, _, prompts = arith_setup

    class Down(LocalTeacher):
        def score(self, rollout, full=False):
            s = super().score(rollout, full=full)
            s.scored_mask[:] = 0
            s.token_logprobs[:] = 0.0
            return s

    params = SamplingParams(max_new_tokens=12)
    for out in (evaluate(student, Down(teacher), tok, prompts, params, seed=0),
                detailed_eval(student, Down(teacher), tok, prompts, params, seed=0)):
        assert "eval/reverse_kl" not in out and "eval/teacher_nll" not in out and out["eval/length"] > 0
        json.dumps(out, allow_nan=False)


def test_opd_eval_of_a_runs_own_weights_reproduces_its_metrics_row(tmp_path):
    # opd eval sampled with the config's seed, the run with a seed of its step: the figures of the same weights
    # on the same prompts differed (accuracy 0.922 against the row's 0.875).
    from typer.testing import CliRunner

    from opd.cli import app
    from opd.config import load_config
    from opd.loop import run
    from opd.monitor import read_metrics

    sets = ["student.warm_start_steps=3", "student.warm_start_samples=8", "prompts.batch_size=4", "eval.size=8",
            "eval.recovery_size=0", "monitor.live='off'", "monitor.tensorboard=false", "train.max_steps=2",
            "rollout.max_new_tokens=16", "train.keep_checkpoints=5", "eval.every=1", "train.checkpoint_every=1"]
    run(load_config(None, sets), tmp_path / "run", log=lambda *a: None)
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    for model, step in ((tmp_path / "run" / "final", 2), (tmp_path / "run" / "checkpoints" / "step-1", 1)):
        res = CliRunner().invoke(app, ["eval", str(model), "--out", str(tmp_path / "eval.json")])
        assert res.exit_code == 0, res.output
        assert f"as the run evaluated step {step}" in res.output
        got = json.loads((tmp_path / "eval.json").read_text())
        for key in ("eval/accuracy", "eval/reverse_kl", "eval/teacher_nll", "eval/length"):
            assert got[key] == pytest.approx(rows[step][key], rel=1e-5, abs=1e-6), key
