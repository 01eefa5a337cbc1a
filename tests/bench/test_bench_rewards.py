"""bench/rewards.py: the benches' parity reward gives both values at about even odds (so groups have non-zero
advantages), is a function of the text alone, and reads the same text the same way in red.train's and TRL's
signatures."""

import random

import torch

from bench.rewards import parity, red_reward, trl_reward
from red.algorithm import group_advantages


def test_parity_is_deterministic_and_about_even():
    rng = random.Random(0)
    texts = [
        "".join(rng.choice("abcdef 0123456789\\{}") for _ in range(rng.randint(1, 80))) for _ in range(2000)
    ]
    values = [parity(t) for t in texts]
    assert set(values) == {0.0, 1.0}
    assert 0.45 < sum(values) / len(values) < 0.55
    assert values == [parity(t) for t in texts]


def test_both_signatures_read_the_completion_text():
    texts = ["x = 4", "\\boxed{12}", "so the answer is 7"]
    red = [red_reward("prompt", t, "12", {}) for t in texts]
    trl = trl_reward([[{"role": "assistant", "content": t}] for t in texts])
    assert red == trl == [parity(t) for t in texts]
    assert trl_reward(texts) == red  # plain-text completions too


def test_groups_of_eight_almost_always_get_non_zero_advantages():
    rng = random.Random(1)
    rewards = torch.tensor([[parity(str(rng.random())) for _ in range(8)] for _ in range(500)])
    adv = group_advantages(rewards, torch.zeros_like(rewards, dtype=torch.bool))
    assert float((adv != 0).float().mean()) > 0.97
