"""A teacher that only gives scores (a reward model behind /pooling): its sequence-level reward feeds the
`hybrid` objective, with a warning that the signal is sparse."""

import math

import torch
from fastapi import FastAPI

from opd.config import load_config, validate_config
from opd.feedback import compute_feedback
from opd.config import FeedbackConfig
from opd.loop import run
from opd.monitor import read_metrics
from opd.teacher.remote import RemoteSettings, RemoteTeacher
from opd.types import Prompt, Rollout, TeacherScores
from teacher_servers import AppThread



def judge_app(tokenizer):
    """Reward 1 when the completion holds the answer separator '|', else 0 (a stand-in reward model)."""
    bar = tokenizer.convert_tokens_to_ids("|")
    app = FastAPI()
    seen = []

    @app.post("/pooling")
    async def pooling(body: dict):
        seen.append(body["input"])
        return {"object": "list", "data": [{"index": 0, "object": "pooling", "data": [float(bar in body["input"])]}]}

    app.state.seen = seen
    return app


def tiny_rollout():
    return Rollout(
        prompts=[Prompt("1+1=", "s")] * 4, prompt_ids=torch.tensor([[1, 17]] * 4), prompt_mask=torch.ones(4, 2, dtype=torch.long),
        completion_ids=torch.tensor([[20, 2, 0], [20, 21, 2], [22, 2, 0], [20, 20, 20]]),
        completion_mask=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]),
        behaviour_logprobs=torch.full((4, 3), -1.0), policy_version=torch.zeros(4, dtype=torch.long),
        texts=["a", "b", "c", "d"], finished=torch.tensor([True, True, True, False]))


def test_reward_rows_take_the_sequence_signal_on_every_completion_token():
    roll = tiny_rollout()
    # rows 0, 1: token scores from a logprob teacher; rows 2, 3: one reward each from a score-only teacher
    scores = TeacherScores(token_logprobs=torch.full((4, 3), -0.5) * torch.tensor([[1], [1], [0], [0]]),
                           scored_mask=roll.completion_mask * torch.tensor([[1], [1], [0], [0]]),
                           rewards=torch.tensor([float("nan"), float("nan"), 1.0, 0.0]))
    rewards = torch.where(torch.isfinite(scores.rewards), scores.rewards, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    fb = compute_feedback(roll, scores, FeedbackConfig(), rewards=rewards, group_size=2)
    assert torch.equal(fb.loss_mask, roll.completion_mask.float())
    assert torch.allclose(fb.advantages[2, :2], torch.full((2,), 0.7071), atol=1e-3)  # (1 - 0.5) / std
    assert torch.allclose(fb.advantages[3, :3], torch.full((3,), -0.7071), atol=1e-3)
    assert fb.metrics["opd/advantage_mean"] == 0.5 and fb.metrics["reward/teacher_rows"] == 2


def test_pooling_teacher_gives_rewards(tokenizer):
    roll = tiny_rollout()
    roll.completion_ids[1, 1] = tokenizer.convert_tokens_to_ids("|")
    with AppThread(judge_app(tokenizer)) as srv:
        s = RemoteTeacher(RemoteSettings(srv.url, api="pooling", retries=0)).score(roll)
    assert s.rewards.tolist() == [0.0, 1.0, 0.0, 0.0] and s.scored_mask.sum() == 0 and s.tokens_scored == 0


def test_a_score_only_teachers_rewards_are_cached_like_token_scores(tokenizer):
    # A reward answer scores no token (scored_mask 0), and the cache stored only rows with every token scored:
    # identical sequences were sent to a reward model again at every step.
    from opd.teacher.cache import CachingTeacher

    roll = tiny_rollout()
    roll.completion_ids[1, 1] = tokenizer.convert_tokens_to_ids("|")
    app = judge_app(tokenizer)
    with AppThread(app) as srv:
        teacher = CachingTeacher(RemoteTeacher(RemoteSettings(srv.url, api="pooling", retries=0)))
        first = teacher.score(roll)
        again = teacher.score(roll)
    assert len(app.state.seen) == 4 and again.metrics["teacher/cache_hits"] == 4
    assert again.rewards.tolist() == first.rewards.tolist() == [0.0, 1.0, 0.0, 0.0] and again.scored_mask.sum() == 0


def test_hybrid_run_with_a_score_only_teacher_warns_and_learns_from_its_reward(tmp_path):
    from opd.models import load_tokenizer

    with AppThread(judge_app(load_tokenizer("builtin:arith-teacher"))) as srv:
        cfg = load_config(None, [
            "prompts.batch_size=4", "rollout.samples_per_prompt=2", "objective.name='hybrid'", "train.max_steps=2",
            "eval.size=4", "eval.every=0", "student.warm_start_steps=0", "train.checkpoint_every=0",
            "rollout.max_new_tokens=24", "monitor.live='off'", "monitor.tensorboard=false"])
        data = cfg.model_dump()
        data["teachers"] = {"judge": {"url": srv.url, "api": "pooling", "retries": 0}}
        data["prompts"]["sources"] = [{"kind": "builtin", "task": "arith", "name": "dense"},
                                      {"kind": "builtin", "task": "arith", "name": "judged", "teacher": "judge"}]
        lines = []
        run(validate_config(data), tmp_path, log=lines.append)
        asked = len(srv.server.config.app.state.seen)
    assert any("score-only" in line and "sparse" in line for line in lines)
    rows = read_metrics(tmp_path)
    judged = sum(r["teacher/judge/requests"] for r in rows[1:])
    assert 0 < judged < asked  # evaluation asks the judge too
    assert sum(r["reward/teacher_rows"] for r in rows[1:]) == judged  # every judged training row got its reward
    for r in rows[1:]:
        assert r["teacher/judge/tokens"] == 0 and math.isfinite(r["update/loss"])
        assert r["teacher/coverage"] < 1.0  # judged rows have no token scores
