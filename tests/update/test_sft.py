"""The supervised imitation behind the warm start and the offline baseline."""

import pytest
import torch

from opd.rollout import SamplingParams, sample
from opd.update import sft_loss


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sft_loss_is_the_cross_entropy_at_the_datas_temperature(student, tokenizer, prompts, temperature):
    # The warm start took T = 1 on data written at rollout.temperature, where the offline baseline's sft objective
    # (and every other logprob) takes logits / T: at T = 0.5 the two losses were 10.7 and 21.4 on one batch.
    roll = sample(student, tokenizer, prompts, SamplingParams(max_new_tokens=6, temperature=temperature),
                  generator=torch.Generator().manual_seed(0))
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    attention = torch.cat([roll.prompt_mask, roll.completion_mask], 1)
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=attention).logits[:, roll.prompt_ids.shape[1] - 1 : -1]
        lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, roll.completion_ids[..., None])[..., 0]
        want = -lp[roll.completion_mask.bool()].mean()
        assert float(sft_loss(student, roll)) == pytest.approx(float(want), rel=1e-4)
