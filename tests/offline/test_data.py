import json
import math

import pytest
import torch

import opd.offline.data as offline_data
from opd.config import ConfigError, load_config
from opd.loop import run
from opd.monitor import read_metrics
from opd.offline import OfflineData, generate_offline_data
from opd.rollout import SamplingParams
from opd.teacher import LocalTeacher
from opd.types import Prompt

META = {"teacher": "t", "temperature": 1.0}


def _gen(folder, teacher_model, tokenizer, prompts, **kw):
    teacher = LocalTeacher(teacher_model, batch_size=2, topk=3)
    return generate_offline_data(folder, teacher, tokenizer, prompts, SamplingParams(max_new_tokens=8),
                                 meta=kw.pop("meta", META), topk=3, seed=1, max_prompt_tokens=64, log=lambda *a: None)


def test_stored_rows_hold_teacher_logprobs_and_topk(tmp_path, teacher_model, tokenizer, prompts):
    info = _gen(tmp_path, teacher_model, tokenizer, prompts)
    assert info["generated"] == len(prompts) and info["reused"] == 0
    rows = [json.loads(x) for x in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(len(prompts)))
    for r in rows:
        n = len(r["completion_ids"])
        assert len(r["logprobs"]) == n == len(r["topk_ids"]) == len(r["topk_logprobs"])
        # The sampled token's teacher logprob is at most the best top-k logprob.
        assert all(lp <= tk[0] + 1e-5 for lp, tk in zip(r["logprobs"], r["topk_logprobs"]))
        assert tokenizer.decode(r["completion_ids"], skip_special_tokens=True) == r["completion"]
    data = OfflineData(tmp_path, tokenizer, temperature=1.0, max_prompt_tokens=64)
    roll, scores = data.batch(step=1, size=4, seed=0)
    m = roll.completion_mask.bool()
    assert torch.equal(scores.token_logprobs[m], roll.behaviour_logprobs[m])
    assert scores.topk_ids.shape[-1] == 3 and data.num_tokens == sum(len(r["completion_ids"]) for r in rows)


def test_interrupted_generation_resumes_without_regenerating(tmp_path, teacher_model, tokenizer, prompts, monkeypatch):
    whole = tmp_path / "whole"
    _gen(whole, teacher_model, tokenizer, prompts)

    class Interrupt(Exception):
        pass

    def stop_after_first_batch(phase, step):
        if phase == "offline_generate" and step == 0:
            raise Interrupt

    part = tmp_path / "part"
    monkeypatch.setattr(offline_data, "crash_point", stop_after_first_batch)
    with pytest.raises(Interrupt):
        _gen(part, teacher_model, tokenizer, prompts)
    monkeypatch.undo()
    with (part / "data.jsonl").open("a") as f:
        f.write('{"index": 5, "prompt": "tor')  # a torn line from a kill mid-write
    info = _gen(part, teacher_model, tokenizer, prompts)
    assert info["reused"] == 2 and info["generated"] == len(prompts) - 2
    assert (part / "data.jsonl").read_text() == (whole / "data.jsonl").read_text()
    info = _gen(part, teacher_model, tokenizer, prompts)
    assert info == {"generated": 0, "reused": len(prompts), "tokens": 0}


def test_a_partly_written_batch_is_made_again_whole(tmp_path, teacher_model, tokenizer, prompts, monkeypatch):
    # A kill while a batch's rows were being written left some of them; the rest were regrouped into new batches
    # with other generators, so the stored data differed from an uninterrupted generation's (39 of 40 rows).
    whole = tmp_path / "whole"
    _gen(whole, teacher_model, tokenizer, prompts)
    lines = (whole / "data.jsonl").read_text().splitlines(keepends=True)
    part = tmp_path / "part"
    part.mkdir()
    (part / "meta.json").write_text((whole / "meta.json").read_text())
    (part / "data.jsonl").write_text("".join(lines[:3]))  # batch 0 whole (2 rows), one row of batch 1
    info = _gen(part, teacher_model, tokenizer, prompts)
    assert info["reused"] == 2 and info["generated"] == len(prompts) - 2
    assert (part / "data.jsonl").read_text() == (whole / "data.jsonl").read_text()


def test_ctrl_c_during_the_offline_generation_stops_between_batches_and_resume_goes_on(tmp_path, monkeypatch):
    # Ctrl-C / SIGTERM there ended the process with no word (exit 130 or 143); it now stops after the batch it is
    # writing, says how to continue, and the continued run's data equals an uninterrupted generation's.
    import os
    import signal

    sets = ["student.warm_start_steps=0", "prompts.batch_size=4", "eval.size=4", "eval.every=0", "train.max_steps=1",
            "rollout.max_new_tokens=24", "offline.num_prompts=12", "offline.generate_batch_size=4",
            "monitor.tensorboard=false", "train.checkpoint_every=0", "eval.recovery_size=0"]
    run(load_config(None, sets), tmp_path / "whole", mode="offline", log=lambda *a: None)

    def ctrl_c_in_batch_0(phase, step):
        if (phase, step) == ("offline_generate", 0):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(offline_data, "crash_point", ctrl_c_in_batch_0)
    said = []
    result = run(load_config(None, sets), tmp_path / "part", mode="offline", log=said.append)
    assert result.interrupted and result.steps == 0
    assert any("interrupted during the offline data generation" in m and "opd offline --resume" in m for m in said)
    assert len((tmp_path / "part" / "offline-data" / "data.jsonl").read_text().splitlines()) == 4
    monkeypatch.undo()
    run(load_config(None, sets), tmp_path / "part", mode="offline", resume=True, log=lambda *a: None)
    stored = lambda run_dir: (run_dir / "offline-data" / "data.jsonl").read_text()  # noqa: E731
    assert stored(tmp_path / "part") == stored(tmp_path / "whole")
    assert (tmp_path / "part" / "final" / "config.json").is_file() and not (tmp_path / "part" / "final.partial").exists()


def test_other_settings_refuse_the_stored_data(tmp_path, teacher_model, tokenizer, prompts):
    _gen(tmp_path, teacher_model, tokenizer, prompts[:2])
    with pytest.raises(ConfigError, match="other settings"):
        _gen(tmp_path, teacher_model, tokenizer, prompts[:2], meta={**META, "temperature": 0.5})


@pytest.mark.parametrize("loss", ["sequence_kd", "token_kd"])
def test_offline_run_reuses_stored_data_and_counts_its_budget(tmp_path, loss):
    data = tmp_path / "data"
    sets = ["student.warm_start_steps=0", "prompts.batch_size=8", "eval.size=8", "eval.every=0",
            "train.max_steps=3", "rollout.max_new_tokens=56", "offline.num_prompts=16", f"offline.data='{data}'",
            f"offline.loss='{loss}'", "monitor.tensorboard=false", "train.checkpoint_every=0"]
    logs = []
    run(load_config(None, sets), tmp_path / "a", mode="offline", log=logs.append)
    content = (data / "data.jsonl").read_text()
    run(load_config(None, [*sets, "prompts.batch_size=4"]), tmp_path / "b", mode="offline", log=logs.append)
    assert (data / "data.jsonl").read_text() == content  # the training batch size is not a setting of the data
    assert any("generated 16" in str(x) for x in logs) and any("reused all 16" in str(x) for x in logs)
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    stored = sum(len(json.loads(x)["completion_ids"]) for x in content.splitlines())
    assert rows_a[0]["budget/teacher_tokens"] == rows_b[0]["budget/teacher_tokens"] == stored
    assert rows_a[-1]["budget/teacher_tokens"] == stored and rows_a[-1]["budget/student_tokens"] == 0
    assert all(math.isfinite(r["update/loss"]) for r in rows_a[1:])
    assert not any(k.startswith("freshness/") for k in rows_a[-1])
    # teacher-written rows have no student behaviour logprobs: no student logprob, reverse KL or advantage is made up
    assert not {"student/logprob_mean", "opd/reverse_kl", "opd/advantage_mean"} & set(rows_a[-1])
    # what the data depends on is checked: fewer prompts, or other generation batches, are other data
    for other in ("offline.num_prompts=8", "offline.generate_batch_size=4"):
        with pytest.raises(ConfigError, match="other settings.*" + other.split("=")[0].split(".")[1]):
            run(load_config(None, [*sets, other]), tmp_path / other, mode="offline", log=logs.append)
    # ... and the generation batches are offline.generate_batch_size's (rows of a batch share one generator)
    small = [*sets, "offline.generate_batch_size=4", f"offline.data='{tmp_path / 'data4'}'"]
    run(load_config(None, small), tmp_path / "c", mode="offline", log=logs.append)
    assert (tmp_path / "data4" / "data.jsonl").read_text() != content


def test_sequence_kd_is_plain_cross_entropy_at_every_step(tmp_path):
    """Stored teacher rows are not student samples: a later step must not treat them as stale and reweight
    the imitation loss by pi_student / pi_teacher (it did once the pipelined loop's staleness weights came in)."""
    sets = ["student.warm_start_steps=0", "prompts.batch_size=8", "eval.size=8", "eval.every=0",
            "train.max_steps=4", "rollout.max_new_tokens=56", "offline.num_prompts=32", "offline.topk=0",
            "monitor.tensorboard=false", "train.checkpoint_every=0"]
    run(load_config(None, sets), tmp_path / "run", mode="offline", log=lambda *a: None)
    rows = [r for r in read_metrics(tmp_path / "run") if "update/loss" in r]
    assert len(rows) == 4
    for r in rows:  # token-mean cross-entropy = minus the mean logprob of the teacher's tokens
        assert r["update/loss"] == pytest.approx(-r["update/new_logprob_mean"], rel=1e-5)
        assert r.get("freshness/policy_lag", 0) == 0


def test_the_offline_baseline_imitates_all_of_the_teachers_text_and_counts_what_it_cost(tmp_path):
    # broken_prefix = "downweight" (a setting for the student's prefixes) stopped an offline run (no entropy
    # without offline.topk) or reweighted the teacher's text; finished_frac read 1 for rows cut by max_new_tokens;
    # rollout.dtype = "int8" made the teacher write its data with int8 weights (not in the data's settings); the
    # stored top-k's second teacher pass was in no budget.
    from opd.models import count_params, load_model

    sets = ["student.warm_start_steps=0", "prompts.batch_size=4", "eval.size=4", "eval.every=0", "train.max_steps=1",
            "rollout.max_new_tokens=6", "offline.num_prompts=8", "monitor.tensorboard=false", "eval.recovery_size=0",
            "train.checkpoint_every=0"]
    run(load_config(None, [*sets, "offline.topk=0", "feedback.broken_prefix='downweight'"]), tmp_path / "dw",
        mode="offline", log=lambda *a: None)
    row = read_metrics(tmp_path / "dw")[-1]
    assert row["update/loss"] == pytest.approx(-row["update/new_logprob_mean"], rel=1e-5)  # unweighted
    assert row["rollout/finished_frac"] == 0.0  # every arithmetic answer is longer than 6 tokens
    stored = [json.loads(x) for x in (tmp_path / "dw" / "offline-data" / "data.jsonl").read_text().splitlines()]
    assert not any(r["finished"] for r in stored)
    n_teacher = count_params(load_model("builtin:arith-teacher", device="cpu"))
    tokens = read_metrics(tmp_path / "dw")[0]["budget/teacher_tokens"]
    assert read_metrics(tmp_path / "dw")[0]["budget/flops"] == 2 * n_teacher * tokens
    run(load_config(None, [*sets, "offline.topk=3"]), tmp_path / "topk", mode="offline", log=lambda *a: None)
    assert read_metrics(tmp_path / "topk")[0]["budget/flops"] == 2 * 2 * n_teacher * tokens  # written, then scored
    run(load_config(None, [*sets, "offline.topk=3", "rollout.dtype='int8'"]), tmp_path / "int8", mode="offline",
        log=lambda *a: None)
    data = lambda run_dir: (run_dir / "offline-data" / "data.jsonl").read_text()  # noqa: E731
    assert data(tmp_path / "int8") == data(tmp_path / "topk")


def test_old_stored_rows_without_finished_read_it_from_their_end(tmp_path, teacher_model, tokenizer, prompts):
    _gen(tmp_path, teacher_model, tokenizer, prompts)
    data = OfflineData(tmp_path, tokenizer, temperature=1.0, max_prompt_tokens=64)
    eos = tokenizer.eos_token_id
    assert data._finished({"completion_ids": [5, 6, eos]}) and not data._finished({"completion_ids": [5, 6, 7]})
    assert not data._finished({"completion_ids": [5, eos], "finished": False})  # a row that says so is believed
