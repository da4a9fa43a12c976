import torch

from opd.types import Feedback, Prompt, Rollout, TeacherScores, rows_of


def make(B=4, T=3, V=5):
    g = torch.Generator().manual_seed(0)
    roll = Rollout(prompts=[Prompt(f"p{i}", "s") for i in range(B)], prompt_ids=torch.arange(B * 2).view(B, 2),
                   prompt_mask=torch.ones(B, 2, dtype=torch.long), completion_ids=torch.arange(B * T).view(B, T),
                   completion_mask=torch.ones(B, T, dtype=torch.long), behaviour_logprobs=torch.randn(B, T, generator=g),
                   policy_version=torch.arange(B), texts=[f"t{i}" for i in range(B)], finished=torch.zeros(B, dtype=torch.bool))
    scores = TeacherScores(token_logprobs=torch.randn(B, T, generator=g), scored_mask=torch.ones(B, T, dtype=torch.long),
                           full_logprobs=torch.randn(B, T, V, generator=g))
    fb = Feedback(advantages=torch.randn(B, T, generator=g), loss_mask=torch.ones(B, T), raw_advantages=torch.randn(B, T, generator=g))
    return roll, scores, fb


def test_rows_of_gives_a_slice_for_a_run_and_an_index_otherwise():
    assert rows_of([1, 2, 3]) == slice(1, 4) and rows_of([0]) == slice(0, 1)
    for ids in ([2, 1], [0, 2], [1, 1], []):
        idx = rows_of(ids)
        assert isinstance(idx, torch.Tensor) and idx.tolist() == ids


def test_select_of_a_run_of_rows_takes_views_and_of_others_copies():
    roll, scores, fb = make()
    for ids in ([1, 2], [3, 0], [0, 1, 2, 3], [2]):
        r, s, f = roll.select(ids), scores.select(ids), fb.select(ids)
        idx = torch.tensor(ids)
        assert torch.equal(r.completion_ids, roll.completion_ids[idx]) and [p.text for p in r.prompts] == [f"p{i}" for i in ids]
        assert torch.equal(r.policy_version, roll.policy_version[idx]) and r.texts == [f"t{i}" for i in ids]
        assert torch.equal(s.full_logprobs, scores.full_logprobs[idx]) and torch.equal(f.advantages, fb.advantages[idx])
        run = ids == list(range(ids[0], ids[0] + len(ids)))
        # a run: the same memory (the whole batch's [B, T, V] distribution is not copied); otherwise a copy
        assert (s.full_logprobs.data_ptr() == scores.full_logprobs[ids[0]].data_ptr()) is run
